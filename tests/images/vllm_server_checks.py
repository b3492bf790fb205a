"""Trainer side of tests/images/test_vllm_image.py, run in a container of the vLLM image:

    python vllm_server_checks.py POLICY_DIR HOST:PORT SYNC_DIR     (key in $R1ZERO_ROLLOUT_KEY)

Probes the server's port as the StatefulSet's TCP probes do (connect, close; the port opens once
the engine is built, and a probe must not end the server), then connects a ``ServerEngine`` to it (which pushes this run's starting
weights), samples and compares the server's sampled-token log-probs with this process's own
forward (fp32), moves the policy, checks the server is stale until a weight push and matches
after it; prints ``PHASE1 {json}``. Then waits for ``SYNC_DIR/go`` (the test pauses the server
container first) and pushes again: that push must end in one ``UserError`` within
``push_timeout_s``; prints ``PHASE2 {json}``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import torch


def _gap(engine, policy, prompts, seed: int) -> float:
    from r1zero.grpo.update import build_batch, sequence_logprobs

    rows = [p for p in prompts for _ in range(2)]
    out, lp = engine.sample(rows, 12, 1.0, 1.0, seed=seed)
    batch = build_batch(rows, out.completion_ids, policy.config.pad_token_id)
    train_BT = sequence_logprobs(policy, batch, 1.0)
    return max(abs(float(train_BT[i, j]) - x) for i, row in enumerate(lp) for j, x in enumerate(row))


def main(policy_dir: str, address: str, sync: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1zero.config import RolloutConfig
    from r1zero.errors import UserError
    from r1zero.grpo.vllm_rollout import start_engine

    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    host, port = address.rsplit(":", 1)
    t0, probes = time.perf_counter(), 0
    while probes < 3 and time.perf_counter() - t0 < 300:  # kubelet-style tcpSocket probes
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            probes += 1
        except OSError:
            time.sleep(0.5)
    rcfg = RolloutConfig(engine="vllm", mode="server", server_address=address, push_timeout_s=5.0,
                         start_timeout_s=300.0)
    t0 = time.perf_counter()
    engine = start_engine(rcfg, policy, tok, max_len=128, seed=0)
    res: dict = {"connect_s": time.perf_counter() - t0, "probes": probes}
    prompts = [[5, 9, 12, 7], [20, 3, 3, 41, 8], [11, 30]]
    res["gap_start"] = _gap(engine, policy, prompts, seed=3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    res["gap_stale"] = _gap(engine, policy, prompts, seed=3)
    t0 = time.perf_counter()
    engine.update_weights(policy)
    res["push_s"] = time.perf_counter() - t0
    res["gap_pushed"] = _gap(engine, policy, prompts, seed=3)
    print("PHASE1 " + json.dumps(res), flush=True)
    while not os.path.exists(os.path.join(sync, "go")):
        time.sleep(0.2)
    t0 = time.perf_counter()
    try:
        engine.update_weights(policy)
        out = {"error": None}
    except UserError as err:
        out = {"error": str(err)}
    out["s"] = time.perf_counter() - t0
    print("PHASE2 " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
