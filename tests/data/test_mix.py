"""Tests for r1zero.data.mix: accounting, ratios, decontamination, determinism, imports, S3."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHashLSH

from r1zero.config import load_config
from r1zero.data.dedup import MinHasher, normalise, token_hashes, tokens
from r1zero.data.manifest import check_accounting
from r1zero.data.mix import interleave, largest_remainder, run_mix
from r1zero.data.shards import iter_rows, read_rows
from r1zero.data.tokenizer import load_tokenizer

SMALL = ["data.n_train=1000", "data.n_eval=200", "data.max_difficulty=2", "data.vocab_size=320",
         "data.tokenizer_rows=400", "data.chunk_rows=256", "data.shard_rows=400"]


def _cfg(*extra):
    return load_config(None, [*SMALL, *extra])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("mix") / "data"
    manifest = run_mix(_cfg(), str(out))
    return out, manifest


def test_largest_remainder_and_interleave():
    assert largest_remainder(10, {"a": 0.3, "b": 0.25, "c": 0.15, "d": 0.3}) == {"a": 3, "b": 3, "c": 1, "d": 3}
    assert sum(largest_remainder(4001, {"a": 0.3, "b": 0.25, "c": 0.15, "d": 0.3}).values()) == 4001
    assert largest_remainder(5, {"a": 0, "b": 0}) == {"a": 0, "b": 0}
    order = interleave({"a": 3, "b": 1, "c": 2})
    assert Counter(order) == {"a": 3, "b": 1, "c": 2}
    assert order[:2] != ["a", "a"]  # smooth: no long runs of one domain


def test_manifest_accounting_and_counts_match_the_shards(small):
    out, m = small
    for key in ("rows_in", "rows_kept", "rows_quarantined", "ratios", "counts", "config_hash", "content_hash", "files"):
        assert key in m
    assert m["rows_in"] == m["rows_kept"] + sum(m["rows_quarantined"].values())
    assert json.loads((out / "manifest.json").read_text()) == m
    train, ev, quar = (read_rows(out, s) for s in ("train", "eval", "quarantine"))
    assert Counter(r["domain"] for r in train) == {k: v for k, v in m["counts"]["train"].items() if v}
    assert Counter(r["domain"] for r in ev) == {k: v for k, v in m["counts"]["eval"].items() if v}
    assert set(r["domain"] for r in ev) <= {"math", "code", "cross"}
    assert Counter(r["reason"] for r in quar) == m["rows_quarantined"]
    assert len(train) + len(ev) == m["rows_kept"] and len(quar) == sum(m["rows_quarantined"].values())
    assert len({r["id"] for r in train + ev + quar}) == len(train) + len(ev) + len(quar)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(m["files"]) == files
    assert [m["files"][f]["rows"] for f in files if f.startswith("train/")] == [400, 400, 200]
    assert "/tmp" not in (out / "manifest.json").read_text()
    check_accounting(m)
    m2 = dict(m, rows_in=m["rows_in"] + 1)
    with pytest.raises(AssertionError):
        check_accounting(m2)


def test_ratios_hit_targets(small):
    _, m = small
    assert m["target_ratios"] == {"math": 0.3, "code": 0.25, "cross": 0.15, "general": 0.3}
    for k, target in m["target_ratios"].items():
        assert abs(m["ratios"][k] - target) < 0.01
    assert sum(m["counts"]["train"].values()) == 1000 and sum(m["counts"]["eval"].values()) == 200


def test_custom_ratios(tmp_path):
    m = run_mix(_cfg("data.mix.math=0.5", "data.mix.code=0.1", "data.mix.cross=0.05", "data.mix.general=0.35",
                     "data.n_train=700", "data.n_eval=0"), str(tmp_path / "d"))
    assert m["counts"]["train"] == {"math": 350, "code": 70, "cross": 35, "general": 245}
    assert max(abs(m["ratios"][k] - m["target_ratios"][k]) for k in m["ratios"]) < 0.01
    assert read_rows(tmp_path / "d", "eval") == []


def test_no_eval_item_or_near_duplicate_in_train(small):
    out, m = small
    train, ev = read_rows(out, "train"), read_rows(out, "eval")
    assert not {normalise(r["prompt"]) for r in train} & {normalise(r["prompt"]) for r in ev}
    hasher = MinHasher(threshold=0.8)
    sig_e = hasher.signatures(token_hashes([tokens(r["prompt"]) for r in ev]))
    sig_t = hasher.signatures(token_hashes([tokens(r["prompt"]) for r in train]))
    # datasketch's own LSH over the eval signatures, queried with every train row
    from datasketch import LeanMinHash, MinHash

    def lean(sig):
        return LeanMinHash(MinHash(num_perm=64, hashvalues=sig.astype(np.uint64), scheme="affine32"))

    lsh = MinHashLSH(num_perm=64, params=(hasher.bands, hasher.rows_per_band))
    for i, s in enumerate(sig_e):
        lsh.insert(i, lean(s))
    for s in sig_t:
        for j in lsh.query(lean(s)):
            assert (sig_e[j] == s).mean() < 0.8
    assert m["rows_quarantined"].get("contaminated_exact", 0) > 0  # the small tiny space does collide


def test_planted_contamination_and_bad_import_lines_are_quarantined(small, tmp_path):
    out, m0 = small
    ev = read_rows(out, "eval")
    code = [r for r in ev if r["domain"] == "code"][:5]
    lines = []
    for r in code:
        lines.append(json.dumps({"prompt": r["prompt"], "answer": r["answer"], "domain": "code"}))  # exact copy
        lines.append(json.dumps({"prompt": r["prompt"] + " Answer briefly.", "answer": r["answer"], "domain": "code"}))
    lines += ['{"prompt": "broken', '{"prompt": "What is 2 + 2?", "answer": "4"}']  # bad JSON, missing domain
    imp = tmp_path / "user.jsonl"
    imp.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff"}\n')
    cfg = _cfg(f'data.imports=[{{"uri": "{imp}", "format": "generic", "split": "train"}}]')
    m = run_mix(cfg, str(tmp_path / "d"))
    assert read_rows(tmp_path / "d", "eval") == ev  # eval is unaffected by train imports
    q = [r for r in read_rows(tmp_path / "d", "quarantine") if r["source"] == "import:generic:user.jsonl"]
    by = Counter(r["reason"] for r in q)
    assert by == {"contaminated_exact": 5, "contaminated_near": 5, "bad_json": 1, "missing_field": 1, "bad_utf8": 1}
    assert m["rows_in"] == m["rows_kept"] + sum(m["rows_quarantined"].values())
    assert m["data_config"]["imports"] == [{"name": "user.jsonl", "format": "generic", "split": "train"}]
    assert str(tmp_path) not in (tmp_path / "d" / "manifest.json").read_text()


def test_imports_fill_quota_first_and_overflow_is_quarantined(tmp_path):
    imp = tmp_path / "gsm.jsonl"
    rows = [{"question": f"Sam has {i} marbles and finds {i + 7} more. How many marbles now?",
             "answer": f"{i} + {i + 7} = {2 * i + 7}\n#### {2 * i + 7}"} for i in range(40)]
    imp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(f'data.imports=[{{"uri": "{imp}", "format": "gsm8k", "split": "train"}}]', "data.n_train=100",
               "data.n_eval=0", "data.dedup.near=false")
    m = run_mix(cfg, str(tmp_path / "d"))
    assert m["counts"]["train"]["math"] == 30 and m["rows_quarantined"]["over_quota"] == 10
    assert m["sources"]["import:gsm8k:gsm.jsonl"] == 30
    train = read_rows(tmp_path / "d", "train")
    assert sum(r["source"].startswith("import") for r in train) == 30


def test_same_config_same_bytes(small, tmp_path):
    out, m = small
    run_mix(_cfg(), str(tmp_path / "again"))
    again = tmp_path / "again"
    a = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    b = {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()}
    assert a == b
    other = run_mix(_cfg("seed=1"), str(tmp_path / "seed1"))
    assert other["content_hash"] != m["content_hash"]


def test_exhausted_generator_is_reported_not_looped(tmp_path, capsys):
    cfg = _cfg("data.mix.math=1.0", "data.mix.code=0", "data.mix.cross=0", "data.mix.general=0",
               "data.max_difficulty=1", "data.n_train=20000", "data.n_eval=0", "data.chunk_rows=2048")
    m = run_mix(cfg, str(tmp_path / "d"))
    rep = m["generation"]["train"]["math"]
    assert rep["exhausted"] and len(rep["retired_cells"]) == 3
    assert m["counts"]["train"]["math"] < 20000
    assert m["rows_in"] == m["rows_kept"] + sum(m["rows_quarantined"].values())
    assert "generators exhausted for math" in capsys.readouterr().out


def test_tokenizer_in_the_artifact(small):
    out, m = small
    tok = load_tokenizer(out)
    assert len(tok) == 320 == m["tokenizer"]["vocab_size"]
    assert tok.convert_tokens_to_ids("<think>") != tok.unk_token_id


def test_s3_round_trip_and_s3_import(s3_bucket, tmp_path):
    import boto3

    from r1zero import store

    imp = tmp_path / "g.jsonl"
    imp.write_bytes(b'{"prompt": "Convert 7 km to m.", "answer": "7000", "domain": "cross"}\nnot json\n')
    client = store.s3_client()
    client.upload_file(str(imp), s3_bucket, "inputs/g.jsonl")
    uri = f"s3://{s3_bucket}/runs/data"
    cfg = _cfg(f'data.imports=[{{"uri": "s3://{s3_bucket}/inputs/g.jsonl", "format": "generic", "split": "train"}}]',
               "data.n_train=200", "data.n_eval=40")
    m = run_mix(cfg, uri)
    assert m["rows_quarantined"]["bad_json"] == 1 and m["sources"]["import:generic:g.jsonl"] == 1
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=store._settings.endpoint_url, region_name="us-east-1")
            .list_objects_v2(Bucket=s3_bucket, Prefix="runs/data/")["Contents"]}
    assert {"runs/data/manifest.json", "runs/data/tokenizer.json", "runs/data/_SUCCESS"} <= keys
    train = list(iter_rows(uri, "train"))
    assert len(train) == 200 and any(r["prompt"] == "Convert 7 km to m." for r in train)
    local = Path(store.materialize(uri))
    assert json.loads((local / "manifest.json").read_text()) == m
    assert load_tokenizer(uri).eos_token == "<|endoftext|>"


def test_auto_split_and_jsonl_shards(tmp_path):
    imp = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"Convert {i} km to m, then add {i % 7}.", "answer": str(1000 * i + i % 7), "domain": "cross"}
            for i in range(2, 202)]
    imp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(f'data.imports=[{{"uri": "{imp}", "format": "generic"}}]', "data.n_train=600", "data.n_eval=400",
               "data.shard_format=jsonl.gz")
    m = run_mix(cfg, str(tmp_path / "d"))
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == ["part-00000.jsonl.gz", "part-00001.jsonl.gz"]
    tr = [r for r in read_rows(tmp_path / "d", "train") if r["source"].startswith("import")]
    ev = [r for r in read_rows(tmp_path / "d", "eval") if r["source"].startswith("import")]
    # auto: each row goes to eval with probability n_eval / (n_train + n_eval) = 0.4, by prompt hash
    q_eval = m["quarantine_by_split"]["eval"].get("over_quota", 0)
    q_train = m["quarantine_by_split"]["train"].get("over_quota", 0)
    assert len(tr) + len(ev) + q_eval + q_train == 200
    assert 55 < len(ev) + q_eval < 105  # binomial(200, 0.4): 80 +- 7
    # imports fill the cross quotas (train 90, eval 86) before the generators; the rest is over quota
    assert len(tr) == min(90, len(tr) + q_train) and len(ev) == min(86, len(ev) + q_eval)
    assert m["counts"]["train"]["cross"] == 90 and m["counts"]["eval"]["cross"] == 86


def test_missing_s3_import_is_a_user_error(s3_bucket):
    from r1zero.errors import UserError

    cfg = _cfg(f'data.imports=[{{"uri": "s3://{s3_bucket}/nope.jsonl", "format": "gsm8k"}}]')
    with pytest.raises(UserError, match="nope.jsonl"):
        run_mix(cfg, f"s3://{s3_bucket}/out")
