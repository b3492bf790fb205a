"""MoE pretraining stage: data artifact -> HF model dir (+ metrics.jsonl, summary.json, checkpoints/).

    r1zero pretrain --config configs/tiny.yaml --data runs/tiny/data --out runs/tiny/pretrain
    torchrun --nproc-per-node 2 -m r1zero.cli pretrain --config configs/tiny.yaml \
        --set parallel.dp=2 --data runs/tiny/data --out runs/tiny/pretrain
    deepspeed --num_gpus 2 --module r1zero.cli pretrain ...                      # same flags

Python: ``run_pretrain(cfg, data_uri, out_uri) -> summary``. The run reads the torch elastic
environment (a PyTorchJob running bare ``torchrun`` works), validates the parallel layout before
creating any process group, builds the model from ``cfg.model`` with ``cfg.seed``, and trains on
packed documents (:mod:`r1zero.train.data`).

Engine: every layout runs on :class:`r1zero.train.engine.TrainEngine` (FSDP2, DTensor TP with
sequence parallelism, expert parallelism, ``torch.distributed.pipelining`` 1F1B), composed by
:func:`r1zero.train.parallelize.parallelize` on a meta-device model; each rank materialises only
its shards, with the world-1 initial values.

Resume: when the checkpoint root holds a valid checkpoint, the run continues from it (engine
state through ``torch.distributed.checkpoint``, data position, RNG state, metrics so far), in any
layout, and reproduces the uninterrupted run exactly on CPU in the same layout. Output layout: the HF model dir (``save_pretrained`` safetensors + tokenizer files),
``metrics.jsonl`` (``{"step", "name", "value"}`` per line: ``train/*``, ``moe/L{i}/*``),
``summary.json`` (with ``heldout_accuracy`` per domain) and ``checkpoints/step-*``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from r1zero import store
from r1zero.errors import UserError
from r1zero.progress import progress
from r1zero.train import dist as rdist
from r1zero.train.checkpoint import Checkpointer
from r1zero.train.data import PackedSequences, build_documents
from r1zero.train.parallel_dims import ParallelDims
from r1zero.train.precision import check_precision

# ---------------------------------------------------------------------------------------------
# inputs


def load_rows(data_dir: Path, split: str) -> list[dict]:
    """Rows of a data artifact split (the data package's reader, or the parquet shards directly)."""
    try:
        from r1zero.data.shards import read_rows

        return list(read_rows(data_dir, split))
    except ImportError:
        import pyarrow.parquet as pq

        parts = sorted((data_dir / split).glob("part-*.parquet"))
        if not parts:
            raise UserError(f"data artifact {data_dir} has no {split}/part-*.parquet shards") from None
        return [r for p in parts for r in pq.read_table(p).to_pylist()]


def load_tokenizer(data_dir: Path):
    try:
        from r1zero.data.tokenizer import load_tokenizer as _load
    except ImportError:
        _load = None
    if _load is not None:
        return _load(data_dir)
    from transformers import PreTrainedTokenizerFast

    path = data_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"data artifact {data_dir} has no tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|pad|>")


# ---------------------------------------------------------------------------------------------
# engine choice


def new_model(cfg, tokenizer):
    """A fresh :class:`R1ZeroForCausalLM` from ``cfg.model``; identical on every rank (seeded).

    With ``model.base`` the base checkpoint instead (any transformers causal LM: continued
    pretraining), loaded in train mode.
    """
    from r1zero.model import build_model, load_causal_lm

    if cfg.model.base:
        from r1zero.data.base import base_path

        model, _ = load_causal_lm(base_path(cfg.model.base), require_tokenizer=False)
        return model.train()
    return build_model(cfg.model, seed=cfg.seed, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def build_engine(cfg, ctx, tokenizer):
    """Meta model -> parallelize -> materialise this rank's shards -> :class:`TrainEngine`.

    With ``model.base`` (continued pretraining) the base's weights are loaded into the shards
    (every rank reads the base checkpoint; the layout may be any)."""
    from r1zero.train.engine import TrainEngine
    from r1zero.train.parallelize import build_meta_model, materialize, parallelize

    base = new_model(cfg, tokenizer) if cfg.model.base else None
    if base is not None and type(base).__name__ != "R1ZeroForCausalLM":
        raise UserError(f"model.base {cfg.model.base}: continued pretraining needs a checkpoint that maps "
                        f"onto r1zero's model (got {type(base).__name__})")
    overrides = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    meta = build_meta_model(cfg, **overrides) if base is None else build_meta_model(cfg, hf_config=base.config)
    pm = parallelize(meta, ctx.mesh, cfg)
    materialize(pm, ctx.device, seed=cfg.seed)
    if base is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(pm.model, base.state_dict(), options=StateDictOptions(full_state_dict=True,
                                                                                    strict=False))
        del base
    return TrainEngine(cfg, ctx, pm)


def _telemetry(cfg, ctx):
    try:
        from r1zero import telemetry
    except ImportError:
        return None
    try:
        tel = telemetry.start(cfg.telemetry, job=cfg.name, rank=ctx.rank, stage="pretrain",
                              **telemetry.mfu_inputs(cfg, ctx.device, ctx.dims.world_size))
        if ctx.mesh is not None:  # communication time and bytes by purpose (docs/observability.md)
            tel.comm_timer().name_mesh(ctx.mesh, {"dp": "fsdp", "edp": "fsdp", "tp": "tp", "pp": "pipeline",
                                                  "ep": "expert"})
        return tel
    except Exception as err:  # noqa: BLE001 - telemetry must never stop training
        import warnings

        warnings.warn(f"telemetry disabled: {type(err).__name__}: {err}", stacklevel=2)
        return None


class MetricsLog:
    """``metrics.jsonl`` rows kept in memory (rank 0) and rewritten atomically at each flush."""

    def __init__(self, path: Path, rows: list[dict] | None = None):
        self.path, self.rows = path, list(rows or [])

    def add(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.rows.append({"step": int(step), "name": name, "value": float(value)})

    def flush(self) -> None:
        store.atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))


# ---------------------------------------------------------------------------------------------


def _micro_batches(packed: PackedSequences, step: int, pre, dims: ParallelDims, coords: dict) -> list[torch.Tensor]:
    """This rank's grad_accum micro-batches of global step ``step`` (m = dp_rank * ga + a)."""
    n_micro = pre.grad_accum * dims.dp
    return [packed.micro_batch(step, coords["dp"] * pre.grad_accum + a, pre.micro_batch, n_micro)
            for a in range(pre.grad_accum)]


def train(cfg, data_uri: str, work: Path, ckpt_uri: str) -> dict:
    """The training loop; writes model/metrics/summary into ``work`` on rank 0. Collective."""
    pre = cfg.pretrain
    env = rdist.read_env()
    dims = ParallelDims.from_config(cfg.parallel, cfg.model, world_size=env.world_size, grad_accum=pre.grad_accum)
    device = rdist.device_for(env)
    check_precision(pre.precision, device)
    max_len, vocab = cfg.model.max_seq_len, cfg.model.vocab_size
    if cfg.model.base:  # the base's own shape (config.json), not the from-scratch fields
        from r1zero.data.base import check_base

        base_cfg = check_base(cfg.model.base)["config"]
        max_len = base_cfg.get("max_position_embeddings") or pre.seq_len
        vocab = base_cfg.get("vocab_size") or vocab
    if pre.seq_len > max_len:
        raise UserError(f"pretrain.seq_len ({pre.seq_len}) exceeds the model's max sequence length ({max_len})")
    data_dir = store.materialize(data_uri)
    tokenizer = load_tokenizer(Path(data_dir))
    if len(tokenizer) > vocab:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}")
    rows = load_rows(Path(data_dir), "train")
    packed = PackedSequences.from_texts(build_documents(rows, cfg.seed, cfg.data.template_fraction,
                                                        cfg.data.reasoning_fraction, cfg.data.solution_style),
                                        tokenizer, pre.seq_len, cfg.seed)

    ctx = rdist.init(dims, env)
    torch.manual_seed(cfg.seed)
    engine = build_engine(cfg, ctx, tokenizer)

    ckpt = Checkpointer(ckpt_uri, keep_last=pre.keep_last)
    metrics = MetricsLog(work / "metrics.jsonl")
    start_step = 0
    loaded = ckpt.load_latest()
    if loaded is not None:
        engine.load(loaded.path / "engine")  # any layout: DCP reshards by parameter name
        if loaded.state.get("layout") == dims.describe():
            ckpt.restore_rng(loaded)  # another layout has other ranks: fresh RNG streams
        start_step = int(loaded.state["step"])
        if ctx.is_rank0 and (loaded.path / "metrics.jsonl").is_file():
            metrics.rows = [json.loads(line) for line in (loaded.path / "metrics.jsonl").read_text().splitlines()
                            if line.strip()]

    tel = _telemetry(cfg, ctx)
    losses: list[float] = []
    t_start = time.perf_counter()
    tokens_seen = 0
    step = start_step
    stopped_by_budget = False
    bar = progress(total=pre.steps, desc="pretrain", unit="step", initial=start_step)
    try:
        while step < pre.steps:
            t0 = time.perf_counter()
            res = engine.train_step(_micro_batches(packed, step, pre, dims, ctx.coords))
            if not math.isfinite(res.loss):
                raise RuntimeError(f"non-finite loss {res.loss} at step {step}")
            engine.after_step()
            seconds = time.perf_counter() - t0
            tokens_seen += res.tokens
            step += 1
            losses.append(res.loss)
            moe = engine.moe_metrics() if (step % pre.log_every == 0 or step == pre.steps) else {}
            if ctx.is_rank0:
                metrics.add(step, {"train/loss": res.loss, "train/lm_loss": res.lm_loss, "train/lr": res.lr,
                                   "train/grad_norm": res.grad_norm, "train/tokens_per_s": res.tokens / seconds})
                if moe:
                    metrics.add(step, moe)
                    metrics.flush()  # visible progress for whoever tails metrics.jsonl
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.4f}")
            if tel is not None:
                tel.observe_step(seconds, tokens=res.tokens, loss=res.loss, lr=res.lr, step=step)
                if moe:
                    tel.set_gauges(**{k: v for k, v in moe.items() if "/load/" not in k})
            if step % pre.checkpoint_every == 0 and step < pre.steps:
                _save_checkpoint(ckpt, engine, step, dims, cfg, metrics, ctx)
            over = pre.time_budget_s is not None and time.perf_counter() - t_start > pre.time_budget_s
            if rdist.broadcast_flag(over, ctx.device) and step < pre.steps:
                stopped_by_budget = True
                break
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t_start
    _save_checkpoint(ckpt, engine, step, dims, cfg, metrics, ctx)
    n_params = export_model(cfg, engine, tokenizer, work)
    summary = None
    if ctx.is_rank0:
        metrics.flush()
        summary = _finish(cfg, tokenizer, work, data_dir, dict(
            steps=step, start_step=start_step, stopped_by_time_budget=stopped_by_budget,
            losses=losses, train_seconds=train_seconds, tokens=tokens_seen,
            tokens_per_s=tokens_seen / max(train_seconds, 1e-9), layout=dims.describe(), engine=engine.kind,
            compute_dtype=str(engine.compute_dtype).replace("torch.", "") if engine.compute_dtype else None,
            world_size=dims.world_size, data_epochs=packed.epochs_for(step, pre.micro_batch * pre.grad_accum * dims.dp),
            n_params=n_params,
        ))
    if tel is not None:
        tel.close()
    return summary


def _save_checkpoint(ckpt, engine, step, dims, cfg, metrics, ctx) -> None:
    def write(d: Path) -> None:
        engine.save(d / "engine")
        if ctx.is_rank0:
            metrics.path = d / "metrics.jsonl"
            metrics.flush()
    old = metrics.path
    ckpt.save(step, write, {"layout": dims.describe(), "config_hash": cfg.hash(), "data_position": step})
    metrics.path = old


def export_model(cfg, engine, tokenizer, work: Path) -> int | None:
    """Collective: stream the final weights, one full tensor at a time, into the HF model dir
    (:func:`r1zero.model.hf_export.export_hf`: safetensors shards + index, in the run's
    precision). Returns the parameter count on rank 0 (the tied embedding once)."""
    from r1zero.train.precision import param_dtype

    tensors = engine.full_tensors()
    if not engine.ctx.is_rank0:
        for _ in tensors:
            pass
        return None
    from r1zero.model.hf_export import export_hf

    count = [0]

    def counted():
        for name, t in tensors:
            if not name.endswith("expert_bias_E"):
                count[0] += t.numel()
            yield name, t

    export_hf(counted(), engine.pm.config, work, dtype=param_dtype(cfg.pretrain.precision))
    tokenizer.save_pretrained(str(work))
    return count[0]


def _finish(cfg, tokenizer, work: Path, data_dir, info: dict) -> dict:
    """Rank 0: measure held-out accuracy of the exported model, write summary.json."""
    from r1zero.model import load_causal_lm
    from r1zero.train.heldout import heldout_accuracy

    final, _ = load_causal_lm(str(work), require_tokenizer=False)

    acc = heldout_accuracy(final, tokenizer, load_rows(Path(data_dir), "eval"), cfg)
    summary = {k: v for k, v in info.items() if k != "losses"}
    summary.update({
        "name": cfg.name, "config_hash": cfg.hash(), "seed": cfg.seed, "precision": cfg.pretrain.precision,
        "final_loss": info["losses"][-1] if info["losses"] else None,
        "first_loss": info["losses"][0] if info["losses"] else None,
        "losses": info["losses"], "heldout_accuracy": acc["accuracy"], "heldout": acc,
    })
    store.atomic_write_text(work / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
    return summary


def publish_base(cfg, out_uri: str) -> dict:
    """No pretraining (``model.base`` with ``pretrain.steps: 0``): the base itself is the stage's model."""
    from r1zero.data.base import base_path, check_base

    info = check_base(cfg.model.base, cfg.data.chat_template)
    with tempfile.TemporaryDirectory(prefix="r1zero-base-") as tmp:
        work = Path(tmp) / "model"
        shutil.copytree(base_path(cfg.model.base), work, ignore=shutil.ignore_patterns("checkpoints", ".*"))
        summary = {"name": cfg.name, "config_hash": cfg.hash(), "seed": cfg.seed, "steps": 0, "skipped": True,
                   "base_model_type": info["model_type"], "architectures": info["architectures"]}
        store.atomic_write_text(work / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
        store.publish(work, out_uri)
    return summary


def run_pretrain(cfg, data_uri: str, out_uri: str) -> dict:
    """Pretrain ``cfg.model`` on the data artifact at ``data_uri``; publish the model dir to ``out_uri``.

    Collective under a launcher: every rank calls it; rank 0 returns the summary (others None).
    """
    store.configure(cfg.store)
    if cfg.model.base and cfg.pretrain.steps == 0:
        return publish_base(cfg, out_uri)
    ckpt_uri = cfg.pretrain.checkpoint_uri or store.join(out_uri, "checkpoints")
    remote = store.is_s3(out_uri)
    work = Path(tempfile.mkdtemp(prefix="r1zero-pretrain-")) if remote else store.local_path(out_uri)
    work.mkdir(parents=True, exist_ok=True)
    try:
        summary = train(cfg, data_uri, work, ckpt_uri)
        if remote and summary is not None:
            store.publish(work, out_uri)
        return summary
    finally:
        rdist.shutdown()
        if remote:
            shutil.rmtree(work, ignore_errors=True)
