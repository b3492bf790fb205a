"""Bring your own base (``model.base``) and named benchmarks (``eval.benchmarks``), through the CLIs.

Bases are made here by stock transformers (a dense LlamaForCausalLM and a Mixtral MoE, random
weights) with a byte-level BPE tokenizer built by HF ``tokenizers`` (BOS/EOS/pad, no R1 tags:
the template is plain text for them). Benchmarks are GSM8K- and MATH-format JSONL files written here.

    .venv/bin/python -m pytest tests/test_base_model.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1zero.cli import main
from r1zero.template import render_completion, render_prompt

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
FAST = ["--set", "telemetry.enabled=false", "--set", "data.workers=1"]


# ---------------------------------------------------------------------------------------------
# bases and files made in the test


def gsm8k_lines(n: int, start: int = 0) -> list[str]:
    out = []
    for i in range(start, start + n):
        a, b = 3 + i, 7 + 2 * i
        out.append(json.dumps({"question": f"Tom has {a} apples and buys {b} more. How many apples now?",
                               "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}))
    return out


def math_lines(n: int) -> list[str]:
    out = []
    for i in range(n):
        out.append(json.dumps({"problem": f"Simplify the fraction $\\frac{{{2 * (i + 1)}}}{{{4 * (i + 1) + 2}}}$ "
                                          f"for case {i}.",
                               "solution": f"Divide by 2: $\\boxed{{\\frac{{{i + 1}}}{{{2 * (i + 1) + 1}}}}}$.",
                               "level": f"Level {1 + i % 5}", "type": "Prealgebra"}))
    return out


def build_tokenizer(eos: bool = True, pad: bool = True, chat: bool = True):
    """A byte-level BPE (HF tokenizers) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [render_prompt(json.loads(x)["question"]) + render_completion("3 + 7 = 10", "10")
             for x in gsm8k_lines(40)] + [json.loads(x)["problem"] for x in math_lines(20)]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>" if eos else None,
                                  pad_token="<pad>" if pad else None)
    if chat:
        tok.chat_template = CHAT
    return tok


def make_base(root: Path, kind: str = "llama", tok=None, save_tokenizer: bool = True) -> Path:
    """A random-weight stock transformers model (+ tokenizer) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    tok = tok or build_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(root))
    if save_tokenizer:
        tok.save_pretrained(str(root))
    return root


def write_benchmarks(root: Path) -> tuple[Path, Path]:
    """GSM8K file: 12 good rows, a repeat, a bad JSON line, a row without '#### N', a blank line.
    MATH file: 8 good rows and one without \\boxed{}."""
    root.mkdir(parents=True, exist_ok=True)
    g = gsm8k_lines(12)
    g += [g[3], "{not json", json.dumps({"question": "No final answer?", "answer": "it is 5"}), ""]
    m = math_lines(8) + [json.dumps({"problem": "What is x?", "solution": "x is 3."})]
    (root / "gsm8k_test.jsonl").write_text("\n".join(g) + "\n", encoding="utf-8")
    (root / "math500.jsonl").write_text("\n".join(m) + "\n", encoding="utf-8")
    return root / "gsm8k_test.jsonl", root / "math500.jsonl"


def bench_sets(gsm: Path, mth: Path) -> list[str]:
    return ["--set", f"eval.benchmarks=[{{name: gsm8k, uri: '{gsm}', format: gsm8k}}, "
                     f"{{name: math500, uri: '{mth}', format: math}}]"]


DATA = ["--set", "data.n_train=48", "--set", "data.n_eval=6", "--set", "data.chunk_rows=64"]


# ---------------------------------------------------------------------------------------------
# named benchmarks: every row kept or quarantined with a reason, never cut by a quota


def test_benchmarks_imported_whole_and_train_decontaminated(tmp_path):
    gsm, mth = write_benchmarks(tmp_path / "in")
    # a train import that repeats two benchmark problems: those train rows must go, the benchmark stays
    leak = tmp_path / "in" / "train.jsonl"
    leak.write_text("\n".join(gsm8k_lines(2, start=5) + gsm8k_lines(3, start=100)) + "\n", encoding="utf-8")
    out = tmp_path / "data"
    rc = main(["data", "mix", "--out", str(out), *FAST, *DATA, *bench_sets(gsm, mth),
               "--set", f"data.imports=[{{uri: '{leak}', format: gsm8k, split: train}}]"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    b = m["benchmarks"]
    assert b["gsm8k"]["rows_kept"] == 12 and b["gsm8k"]["rows_quarantined"] == {
        "bad_json": 1, "duplicate_exact": 1, "unparseable_answer": 1}
    assert b["math500"]["rows_kept"] == 8 and b["math500"]["rows_quarantined"] == {"unparseable_answer": 1}
    # 12 > n_eval = 6: a quota would have cut them; it never applies to a benchmark
    assert all("over_quota" not in x["rows_quarantined"] for x in b.values())
    assert m["quarantine_by_split"]["train"].get("contaminated_exact") == 2
    from r1zero.data.shards import read_rows

    rows = read_rows(out, "bench/gsm8k")
    assert len(rows) == 12 and rows[0]["answer"] == "10" and rows[0]["source"].startswith("bench:gsm8k")
    assert {r["answer"] for r in read_rows(out, "bench/math500")} >= {"\\frac{1}{3}"}
    q = read_rows(out, "quarantine")
    leaked = [r for r in q if r["reason"] == "contaminated_exact"]
    assert len(leaked) == 2 and all("benchmark gsm8k" in r["detail"] for r in leaked)
    assert {r["split"] for r in q if r["source"].startswith("bench:")} <= {"bench/gsm8k", "bench/math500"}
    train_prompts = {r["prompt"] for r in read_rows(out, "train")}
    assert not train_prompts & {r["prompt"] for r in rows}


# ---------------------------------------------------------------------------------------------
# bad input: one line naming it, exit 2, nothing written


def _bad(tmp_path, capsys, args, expect: str) -> None:
    out = tmp_path / "out"
    capsys.readouterr()  # drop what building the bases printed
    assert main(["data", "mix", "--out", str(out), *FAST, *DATA, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("r1zero: error: ") and expect in err[0], err
    assert not out.exists()


def test_bad_bases_and_benchmark_files(tmp_path, capsys):
    no_tok = make_base(tmp_path / "no_tok", save_tokenizer=False)
    _bad(tmp_path, capsys, ["--set", f"model.base={no_tok}"], "no tokenizer files")
    no_pad = make_base(tmp_path / "no_pad", tok=build_tokenizer(pad=False))
    _bad(tmp_path, capsys, ["--set", f"model.base={no_pad}"], "no pad token")
    no_eos = make_base(tmp_path / "no_eos", tok=build_tokenizer(eos=False))
    _bad(tmp_path, capsys, ["--set", f"model.base={no_eos}"], "no EOS token")
    no_chat = make_base(tmp_path / "no_chat", tok=build_tokenizer(chat=False))
    _bad(tmp_path, capsys, ["--set", f"model.base={no_chat}", "--set", "data.chat_template=true"], "no chat template")
    t5 = tmp_path / "t5"
    make_base(t5)
    cfg = json.loads((t5 / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps({**cfg, "model_type": "t5", "architectures": ["T5Model"]}))
    _bad(tmp_path, capsys, ["--set", f"model.base={t5}"], "not a causal LM")
    (t5 / "config.json").write_text(json.dumps({**cfg, "model_type": "warp_drive"}))
    _bad(tmp_path, capsys, ["--set", f"model.base={t5}"], "unknown to transformers")
    _bad(tmp_path, capsys, ["--set", f"model.base={tmp_path / 'nowhere'}"], "no such directory")
    gsm, mth = write_benchmarks(tmp_path / "in")
    swapped = ["--set", f"eval.benchmarks=[{{name: math500, uri: '{mth}', format: gsm8k}}]"]
    _bad(tmp_path, capsys, swapped, "eval.benchmarks math500: math500.jsonl has no row in gsm8k format")
    _bad(tmp_path, capsys, ["--set", f"eval.benchmarks=[{{name: g, uri: '{tmp_path / 'x.jsonl'}', format: gsm8k}}]"],
         "import file not found")
    _bad(tmp_path, capsys, ["--set", "grpo.eval_benchmark=nope"], "grpo.eval_benchmark 'nope' is not one of")


# ---------------------------------------------------------------------------------------------
# the stages on a base: data -> (no pretraining) -> GRPO -> eval -> insight


@pytest.mark.slow
@pytest.mark.parametrize("kind,chat", [("llama", False), ("mixtral", True)])
def test_base_through_data_grpo_eval_insight(tmp_path, capsys, kind, chat):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_base(tmp_path / "base", kind)
    base_tok = AutoTokenizer.from_pretrained(str(base))
    gsm, mth = write_benchmarks(tmp_path / "in")
    common = [*FAST, "--set", f"model.base={base}", "--set", f"data.chat_template={str(chat).lower()}",
              *bench_sets(gsm, mth)]
    data = tmp_path / "data"
    assert main(["data", "mix", "--out", str(data), *DATA, *common]) == 0
    m = json.loads((data / "manifest.json").read_text())
    assert m["tokenizer"]["source"] == "base" and m["tokenizer"]["vocab_size"] == len(base_tok)
    data_tok = AutoTokenizer.from_pretrained(str(data))  # the base's own tokenizer, no new BPE
    assert data_tok.get_vocab() == base_tok.get_vocab() and data_tok.eos_token == "</s>"

    pre = tmp_path / "pretrain"  # pretrain.steps 0: the base is the stage's model, copied as is
    assert main(["pretrain", "--data", str(data), "--out", str(pre), *common, "--set", "pretrain.steps=0"]) == 0
    assert json.loads((pre / "summary.json").read_text())["skipped"] is True
    assert (pre / "config.json").read_text() == (base / "config.json").read_text()

    rl = tmp_path / "grpo"
    assert main(["grpo", "--policy", str(pre), "--data", str(data), "--out", str(rl), *common,
                 "--set", "grpo.steps=2", "--set", "grpo.prompts_per_step=2", "--set", "grpo.group_size=2",
                 "--set", "grpo.max_new_tokens=8", "--set", "grpo.eval_every=1", "--set", "grpo.eval_problems=50",
                 "--set", "grpo.eval_benchmark=gsm8k"]) == 0
    names = {json.loads(x)["name"] for x in (rl / "metrics.jsonl").read_text().splitlines()}
    assert "eval/accuracy" in names
    # the periodic curve followed the gsm8k benchmark (12 rows), not the 6-row eval split
    assert json.loads((rl / "summary.json").read_text())["eval_subset"] == 12

    ev_base, ev_rl = tmp_path / "eval_base", tmp_path / "eval_rl"
    ev = ["--set", "eval.n_samples=2", "--set", "eval.k=2", "--set", "eval.max_new_tokens=8",
          "--set", "eval.bootstrap=50", "--set", "eval.n_problems=3"]
    assert main(["eval", "--model", str(pre), "--data", str(data), "--out", str(ev_base), *common, *ev]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(rl), "--data", str(data), "--out", str(ev_rl), "--baseline", str(ev_base),
                 *common, *ev]) == 0
    printed = capsys.readouterr().out
    assert "gsm8k: pass@1" in printed and "(n=12)" in printed and "math500: pass@1" in printed
    doc = json.loads((ev_rl / "metrics.json").read_text())
    assert doc["overall"]["n_problems"] == 3  # n_problems cuts the eval split ...
    for name, n in (("gsm8k", 12), ("math500", 8)):  # ... never a benchmark
        b = doc["benchmarks"][name]
        assert b["rows"]["evaluated"] == n == b["n_problems"]
        for key in ("pass@1", "pass@k", "maj@k", "format_rate", "reflection_rate"):
            assert b[key]["n"] == n and b[key]["lo"] <= b[key]["mean"] <= b[key]["hi"]
        assert b["length_sampled"]["mean"] > 0 and b["baseline"]["n_problems"] == n
        assert b["delta"]["n_paired"] == n
    flat = json.loads((ev_rl / "kfp_metrics.json").read_text())
    assert flat["bench/gsm8k/n"] == 12 and "bench/math500/pass@1" in flat and "delta/bench/gsm8k/pass@1" in flat
    assert "Named benchmarks" in (ev_rl / "report.html").read_text()
    per = [json.loads(x) for x in (ev_rl / "per_problem.jsonl").read_text().splitlines()]
    assert sum(r.get("benchmark") == "gsm8k" for r in per) == 12
    if chat:  # the chat template framed every prompt (the completion is what follows it)
        from r1zero.data.tokenizer import load_tokenizer
        from r1zero.template import prompt_renderer

        p = prompt_renderer(load_tokenizer(rl), True)("What is 2 + 3?")
        assert p.startswith("<|user|>") and p.endswith("<|assistant|>\n<think>")

    ins = tmp_path / "insight" / "events.json"
    assert main(["insight", "detect", "--metrics", str(rl / "metrics.jsonl"), "--out", str(ins), "--no-plots"]) == 0
    assert "events" in json.loads(ins.read_text())

    # the run's summary.json: each benchmark, base against RL
    from components.runtime import build_summary, summary_markdown

    summ = build_summary(data, pre, rl, ev_base, ev_rl, ins.parent)
    gs = summ["benchmarks"]["gsm8k"]
    assert gs["rl"]["n"] == gs["base"]["n"] == 12 and gs["improvement"] == gs["rl"]["accuracy"] - gs["base"]["accuracy"]
    assert "| math500 | 8 |" in summary_markdown(summ)

    # the artifacts load back in stock transformers
    model = AutoModelForCausalLM.from_pretrained(str(rl))
    tok = AutoTokenizer.from_pretrained(str(rl))
    assert type(model).__name__ == ("LlamaForCausalLM" if kind == "llama" else "MixtralForCausalLM")
    assert tok.get_vocab() == base_tok.get_vocab()
    ids = tok("Tom has 3 apples", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.slow
def test_continued_pretraining_from_a_base_resumes(tmp_path):
    from transformers import LlamaForCausalLM

    base = make_base(tmp_path / "base", "llama")
    data = tmp_path / "data"
    common = [*FAST, "--set", f"model.base={base}", "--set", "pretrain.seq_len=64", "--set", "pretrain.micro_batch=2",
              "--set", "pretrain.checkpoint_every=2", "--set", "pretrain.heldout_per_domain=1",
              "--set", "pretrain.heldout_max_new_tokens=4", "--set", "pretrain.warmup_steps=0"]
    assert main(["data", "mix", "--out", str(data), *DATA, *common]) == 0
    out = tmp_path / "pretrain"
    assert main(["pretrain", "--data", str(data), "--out", str(out), *common, "--set", "pretrain.steps=2"]) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["steps"] == 2 and first["start_step"] == 0
    # more steps, same checkpoint root: continues from step 2 instead of starting again
    assert main(["pretrain", "--data", str(data), "--out", str(out), *common, "--set", "pretrain.steps=4"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["steps"] == 4 and again["start_step"] == 2 and len(again["losses"]) == 2
    model = LlamaForCausalLM.from_pretrained(str(out))
    start = LlamaForCausalLM.from_pretrained(str(base))
    w, w0 = model.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight
    assert w.shape == w0.shape and not torch.equal(w, w0)  # trained from the base's weights


def test_plan_takes_the_base_shape(tmp_path, capsys):
    base = make_base(tmp_path / "base", "mixtral")
    from r1zero.config import load_config
    from r1zero.sizing_cli import spec_from_config

    spec = spec_from_config(load_config(None, [f"model.base={base}"]))
    assert (spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.experts, spec.top_k, spec.expert_width) == \
        (2, 64, 4, 2, 4, 2, 96)
    assert spec.vocab == json.loads((base / "config.json").read_text())["vocab_size"]
    assert not spec.tied_embeddings


@pytest.mark.slow
def test_base_and_benchmarks_on_s3(s3_bucket, tmp_path):
    from r1zero import store
    from r1zero.data.shards import read_rows
    from r1zero.model import load_causal_lm

    base = make_base(tmp_path / "base", "llama")
    gsm, _ = write_benchmarks(tmp_path / "in")
    store.publish(base, f"s3://{s3_bucket}/bases/tiny-llama")
    store.write_bytes(f"s3://{s3_bucket}/bench/gsm8k_test.jsonl", gsm.read_bytes())
    common = [*FAST, "--set", f"model.base=s3://{s3_bucket}/bases/tiny-llama",
              "--set", f"eval.benchmarks=[{{name: gsm8k, uri: 's3://{s3_bucket}/bench/gsm8k_test.jsonl', "
                       "format: gsm8k}]"]
    data = f"s3://{s3_bucket}/runs/data"
    assert main(["data", "mix", "--out", data, *DATA, *common]) == 0
    assert len(read_rows(data, "bench/gsm8k")) == 12
    pre = f"s3://{s3_bucket}/runs/pretrain"
    assert main(["pretrain", "--data", data, "--out", pre, *common, "--set", "pretrain.steps=0"]) == 0
    model, tok = load_causal_lm(pre)
    assert type(model).__name__ in ("LlamaForCausalLM", "R1ZeroForCausalLM") and tok.eos_token == "</s>"
    assert main(["data", "mix", "--out", str(tmp_path / "x"), *DATA, "--set",
                 f"model.base=s3://{s3_bucket}/bases/missing"]) == 2
    assert not (tmp_path / "x").exists()
    # a base uploaded by another tool (no _SUCCESS manifest): downloaded object by object
    cli = store.s3_client()
    for f in sorted(base.iterdir()):
        cli.upload_file(str(f), s3_bucket, f"synced/tiny-llama/{f.name}")
    synced = ["--set", f"model.base=s3://{s3_bucket}/synced/tiny-llama"]
    assert main(["data", "mix", "--out", str(tmp_path / "d2"), *FAST, *DATA, *synced]) == 0
    assert main(["pretrain", "--data", str(tmp_path / "d2"), "--out", str(tmp_path / "p2"), *FAST, *synced,
                 "--set", "pretrain.steps=0"]) == 0
    assert (tmp_path / "p2" / "config.json").read_text() == (base / "config.json").read_text()


def test_sizing_and_rendered_jobs_take_the_base_shape_from_config_json(tmp_path):
    """Llama-2-7B's published config.json (no weights needed): 6.74B parameters, and the rendered
    jobs' scratch volume is sized from it instead of the from-scratch model fields."""
    from r1zero.cluster.render import scratch_size
    from r1zero.config import load_config
    from r1zero.sizing_cli import spec_from_config

    base = tmp_path / "llama-2-7b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False}))
    cfg = load_config(None, [f"model.base={base}"])
    spec = spec_from_config(cfg)
    assert spec.layers == 32 and not spec.moe and abs(spec.total_params() / 6.74e9 - 1) < 0.01
    assert scratch_size(load_config(None), "eval") == "2Gi"
    assert scratch_size(cfg, "eval") == f"{-(-int(1.25 * (2 * spec.total_params() + 2**30)) // 2**30)}Gi"
