"""Untrusted code on the GRPO reward path stays contained and the trainer is unaffected.

tests/sandbox/test_hostile.py runs every program of the hostile catalogue
(:data:`r1zero.sandbox.hostile.HOSTILE`, 23 programs: fork bomb, memory bomb, network, signal to
the parent, writes outside, ...) through ``run_code`` directly. Here the same programs reach the
sandbox the way RL does: as ``find_input`` code items (imported user data can carry any
``source``) scored by :class:`r1zero.grpo.rewards.RewardScorer` -> ``verify_many`` for a batch of
rollouts; plus hostile *predictions* (code injected where a Python literal is expected) and
literal inputs that make an honest ``f`` explode. Checks: every verdict is "not correct", the
batch finishes within its time bound, a canary outside the sandbox is intact, no process is left
over, a secret in this process's environment appears in no verdict, and a policy-gradient step
on a tiny model still runs afterwards with finite results.

    .venv/bin/python -m pytest tests/reliability/test_untrusted_code.py -q
"""

from __future__ import annotations

import json
import math
import os
import socket
import time

import psutil
import pytest
import torch

from r1zero.config import RewardConfig
from r1zero.grpo.rewards import RewardScorer
from r1zero.sandbox.hostile import HOSTILE, render
from r1zero.sandbox.runner import STARTUP_GRACE_S
from r1zero.verify import MAX_WORKERS

TIMEOUT_S = 1.0
SECRET_NAME, SECRET_VALUE = "R1ZERO_RELIABILITY_SECRET", "rl-s3cr3t-4b1d-never-in-a-verdict"


@pytest.fixture
def host(tmp_path, monkeypatch):
    d = tmp_path / "outside"
    d.mkdir()
    d.chmod(0o777)
    canary = d / "canary.txt"
    canary.write_text("intact")
    canary.chmod(0o666)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    yield canary, listener
    listener.close()


def _item(i: int, source: str, output) -> dict:
    meta = {"kind": "find_input", "source": source, "func": "f", "output": output}
    return {"id": f"hostile-{i}", "domain": "code", "prompt": "Find x such that f(x) == 3.", "answer": "3",
            "solution": "", "difficulty": 1, "source": "user-import", "meta": json.dumps(meta)}


def _completion(answer: str) -> str:
    return f"Let me try. </think> <answer> {answer} </answer>"


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


@pytest.mark.slow  # ~30 sandbox processes
def test_hostile_code_items_and_predictions_are_contained_on_the_reward_path(host):
    canary, listener = host
    port = listener.getsockname()[1]
    items, texts = [], []
    # 1) hostile item sources: the catalogue program runs at import of the item's module
    for i, name in enumerate(sorted(HOSTILE)):
        src = render(HOSTILE[name], canary=str(canary), secret_name=SECRET_NAME, port=port)
        items.append(_item(i, src + "\n\ndef f(x):\n    return x\n", 3))
        texts.append(_completion("3"))
    # 2) hostile predictions where a literal input is expected: never executed
    honest = "def f(x):\n    return x + 1\n"
    for j, pred in enumerate([f"__import__('os').system('touch {canary.parent}/pwned')",
                              f"open('{canary}', 'w').write('x')", "f(*[1] * 10**9)", "[" * 5000 + "]" * 5000,
                              "lambda: __import__('os').kill(os.getppid(), 9)"]):
        items.append(_item(100 + j, honest, 3))
        texts.append(_completion(pred))
    # 3) honest f, literal inputs that blow it up (memory, time, recursion)
    for j, (src, pred) in enumerate([("def f(x):\n    return len('a' * x)\n", "10**12"),
                                     ("def f(x):\n    while x: x += 1\n    return 3\n", "1"),
                                     ("def f(x):\n    return 3 if x == 0 else f(x - 1)\n", "10**7")]):
        items.append(_item(200 + j, src, 3))
        texts.append(_completion(pred))
    # 4) one honest, correct item: the batch is still scored correctly around the hostile ones
    items.append(_item(300, "def f(x):\n    return 2 * x + 1\n", 3))
    texts.append(_completion("1"))

    before = _children()
    scorer = RewardScorer(RewardConfig(), max_new_tokens=48, timeout_s=TIMEOUT_S)
    t0 = time.monotonic()
    res = scorer.score(items, texts, [12] * len(items), [False] * len(items))
    wall = time.monotonic() - t0

    assert res.correct[-1] is True and res.total[-1] > res.total[0]
    assert not any(res.correct[:-1]), [it["id"] for it, c in zip(items, res.correct) if c]
    assert all(math.isfinite(x) for x in res.total)
    n_sandboxed = len(HOSTILE) + 3 + 1  # programs that run (predictions in 2) are refused before)
    bound = math.ceil(n_sandboxed / MAX_WORKERS) * (TIMEOUT_S + STARTUP_GRACE_S + 1.0) + 5.0
    assert wall <= bound, (wall, bound)
    assert canary.read_text() == "intact"
    assert not (canary.parent / "pwned").exists()
    with pytest.raises(BlockingIOError):
        listener.accept()
    assert _children() - before == set()
    assert os.getppid() > 1

    # the verdicts themselves carry no secret (they end up in samples.jsonl)
    from r1zero.verify import verify_many

    answers = [a for a in res.answers]
    verdicts = verify_many(items, answers, timeout_s=TIMEOUT_S)
    assert all(SECRET_VALUE not in v.detail for v in verdicts)

    # the trainer is unaffected: the real GRPO update (group advantages + clipped policy loss + one
    # AdamW step) runs on a tiny Llama with these rewards, with finite loss and grad norm
    from transformers import LlamaConfig, LlamaForCausalLM

    from r1zero.config import GRPOConfig
    from r1zero.grpo.advantages import advantages
    from r1zero.grpo.update import NanGuard, build_batch, policy_update

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                         pad_token_id=0, bos_token_id=None, eos_token_id=1))
    n = len(items) - len(items) % 4
    prompts = [[2 + (b % 60) for b in it["prompt"].encode()[:12]] for it in items[:n]]
    completions = [[2 + (b % 60) for b in t.encode()[:16]] for t in texts[:n]]
    adv_B = advantages(torch.tensor(res.total[:n]), torch.arange(n) // 4, mode="group")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    stats = policy_update(model, opt, build_batch(prompts, completions, 0), adv_B.float(), GRPOConfig(),
                          params=params, guard=NanGuard(3))
    assert stats["skipped"] == 0 and math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
