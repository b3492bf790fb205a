"""r1zero's standard checkpoints served by vLLM: vLLM's CPU engine (its own environment, ``make
vllm-env``) loads the Glm4Moe, Qwen2-MoE and Mixtral checkpoints r1zero writes, and its fp32 prompt
log-probs equal r1zero's forward to 1e-5 (Llama: tests/grpo/test_vllm_rollout.py).

    .venv/bin/python -m pytest tests/model/test_vllm_parity.py -q     # ~3-7 min on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-vllm"
sys.path.insert(0, str(ROOT / "tests" / "model"))
from test_hf_export import LAYOUTS, random_model  # noqa: E402

# vLLM's CPU attention has kernels for a fixed set of head sizes: 128 / 2 heads = 64 is one
SHAPE = dict(vocab_size=96, hidden_size=128, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
             d_expert=32, rope_theta=500.0, rms_norm_eps=1e-6, max_position_embeddings=64, eos_token_id=1,
             pad_token_id=0)
FAMILIES = ("glm4_moe", "qwen2_moe", "mixtral", "mixtral_wide_heads")

CHECK = textwrap.dedent("""
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm
    job = json.loads(sys.argv[1])
    ids, out = job["ids"], {}
    for d in job["dirs"]:
        llm = vllm.LLM(model=d, skip_tokenizer_init=True, dtype="float32", max_model_len=64, enforce_eager=True,
                       kv_cache_memory_bytes=64 * 2**20, seed=0)
        o = llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=ids)],
                         vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)[0]
        out[d] = [o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
        del llm
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM environment's interpreter, built with ``make vllm-env`` when missing (never skipped)."""
    if not (VENV / ".installed").exists():
        subprocess.run(["make", "vllm-env"], cwd=ROOT, check=True)
    return VENV / "bin" / "python"


@pytest.mark.slow
def test_vllm_serves_the_standard_checkpoints_with_r1zero_logprobs(vllm_python, tmp_path):
    ids = torch.randint(2, SHAPE["vocab_size"], (24,), generator=torch.Generator().manual_seed(0))
    ref = {}
    for name in FAMILIES:
        m = random_model({**SHAPE, **LAYOUTS[name][0]})
        m.save_pretrained(tmp_path / name)
        with torch.no_grad():
            lp = torch.log_softmax(m(ids[None]).logits[0], -1)
        ref[str(tmp_path / name)] = lp[:-1].gather(1, ids[1:, None])[:, 0]
    job = json.dumps({"dirs": list(ref), "ids": ids.tolist()})
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    res = subprocess.run([str(vllm_python), "-c", CHECK, job], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    for d, want in ref.items():
        err = (torch.tensor(got[d]) - want).abs().max().item()
        assert err <= 1e-5, f"{Path(d).name}: vLLM vs r1zero max |dlogprob| {err:.2e}"
