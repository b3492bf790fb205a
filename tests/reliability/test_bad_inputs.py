"""Catalogue of bad inputs: each one, given to the real ``r1zero`` CLI in a subprocess, must give
exit code 2 and exactly one stderr line that names the problem, never a traceback.

Areas: configs (files and ``--set`` overrides), CLI arguments, data files (imports, shards,
tokenizer), manifests (data artifact manifest, Kubernetes manifests for ``launch``), metrics files
(``insight detect``) and stage preconditions. Bad *rows* inside otherwise good data files are not
errors: they are quarantined by reason and counted (``test_bad_rows_are_quarantined_never_lost``).

    .venv/bin/python -m pytest tests/reliability/test_bad_inputs.py -q
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from relutil import TINY_DATA, run_cli  # noqa: E402

TINY = "configs/tiny.yaml"


def _write(p: Path, data: str | bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_data) -> Path:
    """Every bad file the catalogue refers to, under one directory."""
    d = tmp_path_factory.mktemp("bad")
    _write(d / "broken.yaml", "data: [unclosed\n  n_train: 3\n")
    _write(d / "list.yaml", "- name\n- tiny\n")
    _write(d / "unknown_key.yaml", "name: x\nbogus_section: {a: 1}\n")
    _write(d / "latin1.yaml", b"name: caf\xe9\xff\xfe\n")
    _write(d / "missing_import.yaml", "data:\n  imports:\n    - {uri: nowhere/gsm8k.jsonl, format: gsm8k}\n")
    (d / "a_dir.jsonl").mkdir()
    _write(d / "dir_import.yaml", f"data:\n  imports:\n    - {{uri: {d / 'a_dir.jsonl'}, format: generic}}\n")
    _write(d / "bad_format.yaml", "data:\n  imports:\n    - {uri: x.jsonl, format: csv}\n")
    # data artifacts
    (d / "no_manifest").mkdir()
    _write(d / "bad_manifest" / "manifest.json", "{\"rows_in\": 12, \"counts\": ")
    for name in ("bad_tokenizer", "no_train", "bad_shard", "bad_split_type"):
        shutil.copytree(tiny_data, d / name)
    _write(d / "bad_tokenizer" / "tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": ")
    shutil.rmtree(d / "no_train" / "train")
    for part in (d / "bad_shard" / "train").glob("part-*"):
        part.write_bytes(b"PAR1 this is not a parquet file at all PAR1")
    # a shard whose columns have the wrong types (difficulty as text)
    for part in (d / "bad_split_type" / "train").glob("part-*.parquet"):
        t = pq.read_table(part)
        import pyarrow as pa

        t = t.set_column(t.schema.get_field_index("difficulty"), "difficulty",
                         pa.array([str(x) for x in t.column("difficulty").to_pylist()]))
        pq.write_table(t.drop(["prompt"]), part)
    # sandbox inputs
    _write(d / "latin1.py", b"print('caf\xe9')\n")
    # Kubernetes manifests for launch
    _write(d / "not_k8s.yaml", "just: a mapping\nwithout: kind\n")
    _write(d / "k8s_broken.yaml", "apiVersion: v1\nkind: [ConfigMap\n")
    _write(d / "two_configmaps.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    # metrics files
    _write(d / "metrics_badjson.jsonl", '{"step": 2, "name": \n{"step": 3}}\n')
    _write(d / "metrics_missing_field.jsonl", '{"step": 1, "name": "grpo/accuracy"}\n')
    _write(d / "metrics_bad_value.jsonl", '{"step": 1, "name": "grpo/accuracy", "value": "high"}\n')
    _write(d / "metrics_empty.jsonl", "")
    _write(d / "metrics_latin1.jsonl", b'{"step": 1, "name": "caf\xe9", "value": 1}\n')
    return d


# (case id, argv with {bad}/{data} placeholders, regex that names the problem)
CASES: list[tuple[str, list[str], str]] = [
    # --- configs --------------------------------------------------------------------------
    ("config_missing_file", ["config", "show", "--config", "{bad}/nope.yaml"], r"config file not found"),
    ("config_is_directory", ["config", "show", "--config", "{bad}"], r"config file not found"),
    ("config_broken_yaml", ["config", "show", "--config", "{bad}/broken.yaml"], r"not valid YAML"),
    ("config_top_level_list", ["config", "show", "--config", "{bad}/list.yaml"], r"top level must be a mapping"),
    ("config_not_utf8", ["config", "show", "--config", "{bad}/latin1.yaml"], r"not valid YAML|utf-?8"),
    ("config_unknown_key", ["config", "show", "--config", "{bad}/unknown_key.yaml"], r"bogus_section: unknown key"),
    ("set_unknown_key", ["config", "show", "--set", "pretrain.stepz=3"], r"pretrain\.stepz: unknown key"),
    ("set_wrong_type", ["config", "show", "--set", "data.n_train=lots"], r"data\.n_train"),
    ("set_negative", ["config", "show", "--set", "pretrain.steps=-1"], r"pretrain\.steps"),
    ("set_mix_not_one", ["config", "show", "--config", TINY, "--set", "data.mix.math=0.9"], r"sum to 1"),
    ("set_topk_gt_experts", ["config", "show", "--set", "model.moe.top_k=9"], r"top_k .*n_experts"),
    ("set_heads_not_dividing", ["config", "show", "--set", "model.n_heads=3"], r"divisible by n_heads"),
    ("set_bad_enum", ["config", "show", "--set", "pretrain.precision=fp64"], r"pretrain\.precision: must be one of"),
    ("set_no_equals", ["config", "show", "--set", "pretrain.steps"], r"expected KEY=VALUE"),
    ("set_into_scalar", ["config", "show", "--config", TINY, "--set", "seed.value=3"], r"seed is not a section"),
    ("set_port_out_of_range", ["config", "show", "--set", "telemetry.port=70000"], r"telemetry\.port"),
    # --- CLI arguments --------------------------------------------------------------------
    ("cli_unknown_command", ["frobnicate"], r"invalid choice: 'frobnicate'"),
    ("cli_unknown_flag", ["data", "mix", "--out", "{bad}/o", "--fast"], r"unrecognized arguments: --fast"),
    ("cli_missing_required", ["data", "mix", "--config", TINY], r"required: --out"),
    ("cli_pretrain_missing_data", ["pretrain", "--out", "{bad}/o"], r"required: --data"),
    ("cli_sandbox_bad_timeout", ["sandbox", "run", "{bad}/latin1.py", "--timeout", "-3"], r"--timeout must be"),
    ("cli_sandbox_bad_memory", ["sandbox", "run", "{bad}/latin1.py", "--memory-mb", "lots"], r"--memory-mb must be"),
    ("cli_plan_bad_int", ["plan", "--gpus", "many"], r"--gpus: invalid int value"),
    ("cli_plan_no_model", ["plan", "--gpu", "a100-80gb", "--gpus", "8"], r"plan needs --config, --params"),
    ("cli_render_incomplete", ["render", "--out", "-"], r"render needs --stage and --kind"),
    ("cli_bad_s3_uri", ["data", "mix", "--config", TINY, *TINY_DATA, "--out", "s3://"], r"bad S3 URI"),
    # --- data files -----------------------------------------------------------------------
    ("data_import_missing", ["data", "mix", "--config", "{bad}/missing_import.yaml", "--out", "{bad}/o"],
     r"import file not found"),
    ("data_import_is_directory", ["data", "mix", "--config", "{bad}/dir_import.yaml", "--out", "{bad}/o"],
     r"import file .*(not found|unreadable|not a file)"),
    ("data_import_bad_format", ["data", "mix", "--config", "{bad}/bad_format.yaml", "--out", "{bad}/o"],
     r"format: must be one of"),
    ("data_vocab_too_small", ["data", "mix", "--set", "data.vocab_size=100", "--out", "{bad}/o"],
     r"vocab_size 100 too small"),
    ("data_no_verifiable_domain", ["data", "mix", "--set", "data.mix.math=0", "--set", "data.mix.code=0",
                                   "--set", "data.mix.cross=0", "--set", "data.mix.general=1", "--out", "{bad}/o"],
     r"needs a non-zero mix ratio"),
    ("sandbox_source_not_utf8", ["sandbox", "run", "{bad}/latin1.py"], r"not UTF-8"),
    ("sandbox_source_missing", ["sandbox", "run", "{bad}/nope.py"], r"file not found"),
    # --- manifests / artifacts ------------------------------------------------------------
    ("manifest_missing", ["data", "show", "{bad}/no_manifest"], r"no manifest\.json"),
    ("manifest_corrupt_json", ["data", "show", "{bad}/bad_manifest"], r"manifest\.json.*(JSON|json)"),
    ("artifact_missing", ["data", "show", "{bad}/does-not-exist"], r"not found"),
    ("k8s_manifest_not_object", ["launch", "{bad}/not_k8s.yaml", "--local"], r"must be a Kubernetes object"),
    ("k8s_manifest_broken_yaml", ["launch", "{bad}/k8s_broken.yaml", "--local"], r"not valid YAML"),
    ("k8s_manifest_no_job", ["launch", "{bad}/two_configmaps.yaml", "--local"], r"exactly one training job"),
    # --- metrics files ---------------------------------------------------------------------
    ("metrics_missing", ["insight", "detect", "--metrics", "{bad}/nope.jsonl", "--out", "{bad}/ev.json"],
     r"file not found"),
    ("metrics_bad_json", ["insight", "detect", "--metrics", "{bad}/metrics_badjson.jsonl", "--out", "{bad}/ev.json"],
     r"no valid rows .*bad_json"),
    ("metrics_missing_field", ["insight", "detect", "--metrics", "{bad}/metrics_missing_field.jsonl", "--out",
                               "{bad}/ev.json"], r"no valid rows .*missing_field"),
    ("metrics_bad_value", ["insight", "detect", "--metrics", "{bad}/metrics_bad_value.jsonl", "--out",
                           "{bad}/ev.json"], r"no valid rows .*bad_type"),
    ("metrics_empty", ["insight", "detect", "--metrics", "{bad}/metrics_empty.jsonl", "--out", "{bad}/ev.json"],
     r"no valid rows \(0 lines"),
    ("metrics_not_utf8", ["insight", "detect", "--metrics", "{bad}/metrics_latin1.jsonl", "--out", "{bad}/ev.json"],
     r"not UTF-8"),
    # --- stage inputs (RL, eval) ------------------------------------------------------------
    ("grpo_policy_missing", ["grpo", "--policy", "{bad}/nope", "--data", "{data}", "--out", "{bad}/g"],
     r"artifact not found"),
    ("eval_model_not_a_model", ["eval", "--model", "{data}", "--data", "{data}", "--out", "{bad}/e"],
     r"not a model directory"),
    # --- stage inputs (pretraining) -------------------------------------------------------
    ("pretrain_data_missing", ["pretrain", "--data", "{bad}/nope", "--out", "{bad}/o"], r"artifact not found"),
    ("pretrain_layout_mismatch", ["pretrain", "--set", "parallel.dp=2", "--data", "{data}", "--out", "{bad}/o"],
     r"world size is 1"),
    ("pretrain_bad_tokenizer", ["pretrain", "--config", TINY, "--data", "{bad}/bad_tokenizer", "--out", "{bad}/o"],
     r"tokenizer\.json .*not a valid tokenizer"),
    ("pretrain_no_train_shards", ["pretrain", "--config", TINY, "--data", "{bad}/no_train", "--out", "{bad}/o"],
     r"train"),
    ("pretrain_corrupt_shard", ["pretrain", "--config", TINY, "--data", "{bad}/bad_shard", "--out", "{bad}/o"],
     r"part-00000\.parquet"),
    ("pretrain_shard_wrong_schema", ["pretrain", "--config", TINY, "--data", "{bad}/bad_split_type", "--out",
                                     "{bad}/o"], r"part-00000\.parquet.*(schema|column|prompt)"),
    ("pretrain_seq_gt_max", ["pretrain", "--set", "pretrain.seq_len=512", "--data", "{data}", "--out", "{bad}/o"],
     r"seq_len \(512\) exceeds the model's max sequence length \(256\)"),
]


def test_catalogue_size_and_coverage():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    areas = {i.split("_")[0] for i in ids}
    assert {"config", "set", "cli", "data", "manifest", "k8s", "metrics", "pretrain", "grpo", "eval"} <= areas


@pytest.fixture(scope="module")
def results(bad, tiny_data) -> dict[str, subprocess.CompletedProcess]:
    """Every case's CLI subprocess, a few at a time (most of each run is interpreter start-up)."""
    def one(case):
        name, argv, _ = case
        args = [a.replace("{bad}", str(bad)).replace("{data}", str(tiny_data)) for a in argv]
        return name, run_cli(*args, timeout=300)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.slow  # the shared fixture runs 54 CLI subprocesses
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(case, results):
    name, argv, pattern = case
    res = results[name]
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.returncode == 2, (res.returncode, res.stderr[-1500:])
    assert len(lines) == 1, lines
    assert lines[0].startswith("r1zero: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_rows_are_quarantined_never_lost(tmp_path):
    """Bad lines in an import file: exit 0, every line accounted for, quarantine keeps the raw text."""
    good = [{"question": f"Tom has {i} apples and buys {i + 3} more. How many now?",
             "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"} for i in range(20)]
    bad_lines = ["{not json", json.dumps(["a", "list"]), json.dumps({"question": "no answer field"}),
                 json.dumps({"question": "What is 1+1?", "answer": "two, no marker"})]
    raw = "\n".join([json.dumps(r) for r in good] + bad_lines).encode() + b"\n\xff\xfe bad utf8 line\n"
    f = _write(tmp_path / "user.jsonl", raw)
    cfg = _write(tmp_path / "c.yaml", f"data:\n  imports:\n    - {{uri: {f}, format: gsm8k, split: train}}\n")
    out = tmp_path / "data"
    res = run_cli("data", "mix", "--config", cfg, *TINY_DATA, "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    q = m["rows_quarantined"]
    assert m["rows_in"] == m["rows_kept"] + sum(q.values())
    # all 5 bad lines land in quarantine under a reason naming the problem
    qrows = [r for p in sorted((out / "quarantine").glob("part-*")) for r in pq.read_table(p).to_pylist()]
    import_bad = [r for r in qrows if r["split"] == "import"]
    assert len(import_bad) == 5
    assert {r["reason"] for r in import_bad} <= {"bad_json", "bad_utf8", "wrong_type", "missing_field",
                                                  "unparseable_answer"}
    assert len({r["reason"] for r in import_bad}) >= 4
    assert all(r["raw"] for r in import_bad)  # the original line is kept
    assert len(qrows) == sum(q.values())
    # the 20 good lines are either kept (source = the file name) or quarantined with a reason
    kept_from_import = m["sources"].get("import:gsm8k:user.jsonl", 0)
    quarantined_from_import = sum(1 for r in qrows if r["source"].endswith("user.jsonl") and r["split"] != "import")
    assert kept_from_import + quarantined_from_import == len(good)
