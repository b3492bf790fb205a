"""Same config and seed -> identical outputs on CPU: the data artifact (manifest and every file) and
the pretrained tiny model (sha256 of ``model.safetensors``). A different seed must change them,
so the comparison is not vacuous.

    .venv/bin/python -m pytest tests/reliability/test_determinism.py -q
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from relutil import TINY_DATA, TINY_POLICY, run_cli  # noqa: E402


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_data_mix_twice_gives_identical_artifact(tiny_data, tmp_path):
    again = tmp_path / "again"
    res = run_cli("data", "mix", "--config", "configs/tiny.yaml", *TINY_DATA, "--out", again)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (again / "manifest.json").read_bytes() == (tiny_data / "manifest.json").read_bytes()
    assert _tree(again) == _tree(tiny_data)
    other = tmp_path / "seed1"
    res = run_cli("data", "mix", "--config", "configs/tiny.yaml", *TINY_DATA, "--set", "seed=1", "--out", other)
    assert res.returncode == 0, res.stderr[-2000:]
    m0, m1 = (json.loads((d / "manifest.json").read_text()) for d in (tiny_data, other))
    assert m0["content_hash"] != m1["content_hash"]


@pytest.mark.slow
def test_pretrain_twice_gives_identical_checkpoint_hash(tiny_policy, tiny_data, tmp_path):
    """``tiny_policy`` is one run; this repeats it byte for byte (weights, metrics, checkpoint)."""
    again = tmp_path / "again"
    res = run_cli("pretrain", "--config", "configs/tiny.yaml", *TINY_POLICY, "--data", tiny_data, "--out", again)
    assert res.returncode == 0, res.stderr[-2000:]
    sha = {d: hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (tiny_policy, again)}
    assert sha[again] == sha[tiny_policy]
    # metrics without wall-clock rates are identical too
    def rows(d):
        return [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if "per_s" not in r["name"]]
    assert rows(again) == rows(tiny_policy)
    # the final checkpoint's engine shards (DCP's *.distcp data files) are byte-identical as well
    # (MANIFEST checksums); DCP's .metadata index also records the run's checkpoint path and a
    # per-save id, so it differs between two output folders by design and is left out
    def engine_hashes(d):
        m = json.loads((d / "checkpoints" / "step-00000020" / "MANIFEST.json").read_text())["files"]
        return {k: v["sha256"] for k, v in m.items() if k.startswith("engine/") and k.endswith(".distcp")}
    assert engine_hashes(again) == engine_hashes(tiny_policy) != {}
