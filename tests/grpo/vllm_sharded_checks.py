"""vLLM-side checks of the sharded GRPO update with vLLM rollouts (``grpo.update_engine: fsdp2``,
``grpo.rollout.engine: vllm``, colocated), run by the vLLM environment's Python for
tests/grpo/test_sharded_vllm.py:

    .venv-vllm/bin/python tests/grpo/vllm_sharded_checks.py POLICY_DIR DATA_DIR WORK_DIR OUT.json

One process, world 1 (a one-rank gloo group, as ``r1zero grpo`` starts it): a GRPOTrainer holding
no full policy module runs 3 steps (vLLM rollouts and greedy eval, weights pushed from the shards
after every update, export streamed from the shards); then vLLM's sampled-token log-probs are
compared with the sharded policy's, the export with the shards, and a control step whose push is
skipped shows the comparison can fail. Writes the figures as JSON.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

OVERRIDES = ["grpo.steps=3", "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=24",
             "grpo.lr=1e-2", "grpo.eval_every=2", "grpo.eval_problems=8", "grpo.sample_every=1",
             "grpo.checkpoint_every=2", "telemetry.enabled=false", "grpo.beta=0.02", "grpo.reward.overlong=true",
             "grpo.reward.overlong_buffer=16", "grpo.update_engine=fsdp2", "grpo.micro_batch=3",
             "grpo.rollout.engine=vllm"]


def _gap(trainer, seed: int) -> float:
    """max |vLLM's log-prob - the sharded policy's| on 16 sampled completions (temperature 1)."""
    from r1zero.grpo.update import build_batch

    rows = [e.ids for e in trainer.entries[:4] for _ in range(4)]
    out, lp = trainer.engine.sample(rows, 24, 1.0, 1.0, seed=seed)
    batch = build_batch(rows, out.completion_ids, trainer.tok.pad_token_id)
    train_BT = trainer.sharded.logprobs(batch)
    return max(abs(float(train_BT[i, j]) - x) for i, row in enumerate(lp) for j, x in enumerate(row))


def _full_modules() -> list[int]:
    from r1zero.model.modeling import R1ZeroForCausalLM

    return [id(o) for o in gc.get_objects() if isinstance(o, R1ZeroForCausalLM)]


def main(policy_dir: str, data_dir: str, work: str, out_json: str) -> None:
    from transformers import AutoModelForCausalLM

    from r1zero.config import load_config
    from r1zero.grpo.trainer import GRPOTrainer
    from r1zero.train import dist as rdist

    env = rdist.read_env()
    device = torch.device("cpu")
    rdist.init_default_group(env, device)
    work_p = Path(work)
    work_p.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, OVERRIDES)
    res: dict = {}
    trainer = GRPOTrainer(cfg, policy_dir, data_dir, work_p, str(work_p / "checkpoints"), device)
    try:
        gc.collect()
        sharded = trainer.sharded
        res["model_is_none"] = trainer.model is None and sharded.rollout_model is None
        # the only r1zero models alive are the sharded policy and the sharded reference
        res["r1zero_modules"] = sorted(_full_modules()) == sorted([id(sharded.pm.model), id(sharded.ref.model)])
        t0 = time.perf_counter()
        summary = trainer.fit()
        res["fit_s"] = time.perf_counter() - t0
        res["summary"] = {k: summary[k] for k in ("steps", "rollout_engine", "eval_start", "eval_end")}
        res["gap_after_fit"] = _gap(trainer, seed=7)
        # the export (rank 0, streamed from the shards): its tensors equal the shards', and stock
        # transformers loads it (no missing weights) with the sharded policy's log-probs
        from safetensors.torch import load_file

        from r1zero.grpo.update import build_batch, sequence_logprobs

        shards = {k: v.clone() for k, v in sharded.hf_tensors(torch.float32)}
        files = {}
        for f in sorted(work_p.glob("model*.safetensors")):
            files.update(load_file(str(f)))
        res["export_missing"] = sorted(set(shards) ^ set(files))
        res["export_max_diff"] = max(float((files[k] - v).abs().max()) for k, v in shards.items() if k in files)
        res["export_tensors"] = len(shards)
        stock, info = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32, output_loading_info=True)
        res["stock_class"] = f"{type(stock).__module__}.{type(stock).__name__}"
        res["stock_missing"] = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
        rows = [e.ids for e in trainer.entries[:4] for _ in range(4)]
        out, _ = trainer.engine.sample(rows, 24, 1.0, 1.0, seed=11)
        batch = build_batch(rows, out.completion_ids, trainer.tok.pad_token_id)
        res["stock_vs_shards_max"] = float((sequence_logprobs(stock.eval(), batch, 1.0)
                                            - sharded.logprobs(batch)).abs().max())
        # control: one more step whose push is skipped leaves vLLM on the old weights
        pushes = []
        trainer.push_weights = lambda: pushes.append(1)
        trainer.train_step()
        res["gap_stale"] = _gap(trainer, seed=7)
        del trainer.push_weights  # the class's method again
        t0 = time.perf_counter()
        trainer.push_weights()
        res["push_s"] = time.perf_counter() - t0
        res["gap_after_push"] = _gap(trainer, seed=7)
    finally:
        trainer.close()
        rdist.shutdown()
    Path(out_json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5])
