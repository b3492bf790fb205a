"""The typed config tree: presets load, overrides apply, bad configs give one line + exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from r1zero.config import Config, load_config
from r1zero.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_load(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert abs(sum(cfg.data.mix.as_dict().values()) - 1) < 1e-9


def test_default_mix_is_the_articles():
    assert Config().data.mix.as_dict() == {"math": 0.30, "code": 0.25, "cross": 0.15, "general": 0.30}


def test_override_applies_typed_values():
    cfg = load_config(REPO / "configs/tiny.yaml",
                      ["data.mix.math=0.35", "data.mix.general=0.15", "pretrain.steps=7", "model.moe.router=soft"])
    assert cfg.data.mix.math == 0.35 and cfg.pretrain.steps == 7 and cfg.model.moe.router == "soft"


def test_hash_is_stable_and_sensitive():
    a = load_config(REPO / "configs/tiny.yaml")
    b = load_config(REPO / "configs/tiny.yaml")
    c = load_config(REPO / "configs/tiny.yaml", ["seed=1"])
    assert a.hash() == b.hash() != c.hash()


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["data.bogus=1"], "data.bogus: unknown key"),
        (["pretrain.steps=abc"], "pretrain.steps"),
        (["data.mix.math=0.9"], "ratios must sum to 1"),
        (["data.n_train=-5"], "data.n_train"),
        (["model.moe.router=dense"], "model.moe.router: must be one of"),
        (["model.moe.top_k=9"], "top_k"),
        (["model.d_model=129"], "divisible by n_heads"),
        (["nokeyvalue"], "expected KEY=VALUE"),
    ],
)
def test_bad_config_names_the_field(overrides, needle):
    with pytest.raises(UserError) as exc:
        load_config(REPO / "configs/tiny.yaml", overrides)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(lst)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "r1zero.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_cli_config_show_and_bad_config_exit_2():
    ok = _cli("config", "show", "--config", "configs/tiny.yaml", "--set", "data.mix.math=0.35",
              "--set", "data.mix.general=0.15")
    assert ok.returncode == 0, ok.stderr
    assert "math: 0.35" in ok.stdout
    bad = _cli("config", "show", "--config", "configs/tiny.yaml", "--set", "data.mix.math=0.5")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "data.mix" in bad.stderr
