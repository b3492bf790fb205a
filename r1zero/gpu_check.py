"""``make gpu-check``: prove r1zero's CUDA paths on one GPU, printing one JSON object last.

    python -m r1zero.gpu_check --out /tmp/gpu-check                  # on a GPU node (~6-8 min)
    python -m r1zero.gpu_check --out /tmp/gpu-check --data DIR       # reuse a data artifact
    python -m r1zero.gpu_check --cpu-dry-run --out /tmp/gpu-check    # the same phases, toy size, CPU

Phases, each through the same stage functions the CLI and the pods run (no second code path):

1. ``pretrain_bf16``: MoE pretraining of a ~275M-parameter r1zero model (d_model 768, 8 layers,
   8 experts top-2 + 1 shared) in bf16 on the CUDA engine path with the NCCL backend at world
   size 1 (NCCL rejects CPU tensors even there, so a wrong-device collective fails here): loss
   finite and falling, tokens/s, and MFU against the device's bf16 peak.
2. ``pretrain_fp8``: the same model through torchao's float8 training on Hopper, against bf16
   (refused on other GPUs, as ``precision: fp8`` is).
3. ``grpo``: GRPO steps on CUDA from the bf16 checkpoint (policy, sampler, update).
4. ``eval``: the eval stage's generation on CUDA.
5. ``telemetry``: the Prometheus exporter's GPU series (NVML utilisation, memory), scraped from the
   live exporter while the phases run, and the communication-time ratio from its CUDA-event timer.
6. peak GPU memory of each phase against ``r1zero plan``'s estimate for the same model and layout.

Without CUDA (and without ``--cpu-dry-run``) it refuses with one line, exit 2, naming what it would
run. ``--cpu-dry-run`` runs every phase on the CPU (gloo, fp32, a toy model) to test this script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

from r1zero.errors import EXIT_USAGE, UserError

PHASES = ("data", "pretrain_bf16", "pretrain_fp8", "grpo", "eval", "telemetry")

# The check's model: ~275M parameters (~75M active) so a phase runs long past launch overhead on
# an H100/H200 in under two minutes. Overrides of the tiny preset; the CPU dry run shrinks it.
GPU_OVERRIDES = [
    "model.d_model=768", "model.n_layers=8", "model.n_heads=12", "model.max_seq_len=1024",
    "model.moe.n_experts=8", "model.moe.top_k=2", "model.moe.n_shared=1", "model.moe.d_expert=1536",
    "pretrain.seq_len=1024", "pretrain.micro_batch=16", "pretrain.warmup_steps=10", "pretrain.lr=1e-3",
    "pretrain.steps=400", "pretrain.time_budget_s=75", "pretrain.checkpoint_every=100000",
    "pretrain.heldout_per_domain=8", "pretrain.log_every=10",
    "grpo.steps=6", "grpo.prompts_per_step=32", "grpo.group_size=8", "grpo.max_new_tokens=128",
    "grpo.time_budget_s=90", "grpo.eval_every=1000", "grpo.eval_problems=0", "grpo.checkpoint_every=1000",
    "eval.n_problems=64", "eval.n_samples=4", "eval.max_new_tokens=128",
    "telemetry.enabled=false",  # the check runs its own exporter (phase 5) around the stages
]
CPU_OVERRIDES = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.moe.n_experts=4", "model.moe.d_expert=32",
    "pretrain.seq_len=64", "pretrain.micro_batch=4", "pretrain.steps=12", "pretrain.warmup_steps=2",
    "pretrain.checkpoint_every=100000", "pretrain.heldout_per_domain=2", "pretrain.heldout_max_new_tokens=8",
    "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=8",
    "grpo.eval_every=1000", "grpo.eval_problems=0", "grpo.checkpoint_every=1000", "grpo.time_budget_s=60",
    "eval.n_problems=4", "eval.n_samples=2", "eval.k=2", "eval.max_new_tokens=8", "eval.bootstrap=10",
    "telemetry.enabled=false",
]
DATA_OVERRIDES = ["data.n_train=4000", "data.n_eval=200"]
CPU_DATA_OVERRIDES = ["data.n_train=300", "data.n_eval=40", "data.tokenizer_rows=300"]

def bf16_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a CUDA device by name (the planner's datasheet table), None when unknown."""
    from r1zero.sizing import gpu_of_device

    gpu = gpu_of_device(device_name)
    tflops = gpu.peak_tflops.get("bf16") if gpu else None
    return tflops * 1e12 if tflops else None


def plan_of_work(cpu: bool) -> str:
    size = "a toy MoE on the CPU" if cpu else "a ~275M-parameter MoE in bf16 (NCCL, world size 1)"
    return (f"pretraining of {size}, the same in fp8 (torchao, Hopper only), GRPO steps, eval generation, "
            "the exporter's NVML series and comm ratio, and peak memory per phase against `r1zero plan`")


# ---------------------------------------------------------------------------------------------
# measurement helpers


class Scraper:
    """Polls a live /metrics endpoint in the background and keeps the maximum of each series."""

    _LINE = re.compile(r"^(r1zero_[a-z_]+)(\{[^}]*\})?\s+([-+0-9.eEinfa]+)$")

    def __init__(self, url: str, every_s: float = 0.5):
        self.url, self.every_s = url, every_s
        self.maxima: dict[str, float] = {}
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-check-scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.scrape()  # a last read after the work ended

    def scrape(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return
        self.scrapes += 1
        for line in text.splitlines():
            m = self._LINE.match(line)
            if m:
                name, value = m.group(1), float(m.group(3))
                if value == value:  # not NaN
                    self.maxima[name] = max(value, self.maxima.get(name, value))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.scrape()


class Phase:
    """Wall time and peak device memory of one phase (torch.cuda's allocator peak on CUDA)."""

    def __init__(self, name: str, cuda: bool):
        self.name, self.cuda = name, cuda
        self.record: dict = {"phase": name}

    def __enter__(self) -> Phase:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        print(f"gpu-check: {self.name} ...", file=sys.stderr, flush=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.record["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        self.record["seconds"] = round(time.perf_counter() - self.t0, 2)
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            self.record["ok"] = False
            self.record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
            print(f"gpu-check: {self.name} FAILED: {self.record['error']}", file=sys.stderr, flush=True)
            return True  # the check goes on with the next phase; the JSON says what failed
        self.record.setdefault("ok", True)
        return False


def _loss_falling(losses: list[float]) -> bool:
    if len(losses) < 4:
        return False
    k = max(1, len(losses) // 5)
    head, tail = losses[:k], losses[-k:]
    return sum(tail) / len(tail) < sum(head) / len(head)


def planner_estimate_bytes(cfg, device_name: str) -> float | None:
    """``r1zero plan``'s per-GPU memory for this model on one GPU with micro_batch = the run's batch."""
    from r1zero.sizing import Hardware, Layout, estimate, gpu_of_device
    from r1zero.sizing_cli import spec_from_config

    gpu = gpu_of_device(device_name)
    if gpu is None:
        return None
    spec = spec_from_config(cfg)
    pre = cfg.pretrain
    layout = Layout(tp=1, pp=1, dp=1, ep=1, zero_stage=0, micro_batch=pre.micro_batch,
                    recompute="full" if pre.activation_checkpointing else "none")
    est = estimate(spec, Hardware(gpu, 1, 1), layout, pre.micro_batch * pre.grad_accum, pre.precision)
    return est.memory_per_gpu_gb * 1e9


def flops_per_token(cfg) -> float:
    """Model FLOPs per trained token, as the exporter's MFU gauge counts them (telemetry.mfu_inputs)."""
    from r1zero.telemetry import mfu_inputs

    return float(mfu_inputs(cfg, "cpu")["flops_per_token"])


# ---------------------------------------------------------------------------------------------
# phases


def _pretrain(cfg, data: str, out: Path, rec: dict, peak: float | None) -> None:
    from r1zero.train.pretrain import run_pretrain

    summary = run_pretrain(cfg, data, str(out))
    losses = [float(x) for x in summary.get("losses", [])]
    rec.update(steps=summary.get("steps"), tokens_per_s=round(float(summary["tokens_per_s"]), 1),
               first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None,
               loss_finite=all(x == x and abs(x) != float("inf") for x in losses), loss_falling=_loss_falling(losses),
               engine=summary.get("engine"), precision=summary.get("precision"), n_params=summary.get("n_params"))
    if peak:
        rec["mfu"] = round(rec["tokens_per_s"] * flops_per_token(cfg) / peak, 4)
    if not (rec["loss_finite"] and rec["loss_falling"]):
        rec["ok"] = False


def run_check(out: Path, data: str | None, cpu: bool, config: str) -> dict:
    import torch

    from r1zero.config import load_config

    cuda = not cpu
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    capability = torch.cuda.get_device_capability(0) if cuda else None
    peak = bf16_peak_flops(device_name) if cuda else None
    overrides = CPU_OVERRIDES if cpu else GPU_OVERRIDES
    base = load_config(config, [*overrides, "pretrain.precision=" + ("fp32" if cpu else "bf16")])
    report: dict = {"device": device_name, "capability": list(capability) if capability else None,
                    "torch": torch.__version__, "cuda": torch.version.cuda, "bf16_peak_flops": peak,
                    "cpu_dry_run": cpu, "phases": {}}
    # The environment a pod's torchrun gives a world of one: the engine builds a real process group
    # (NCCL on CUDA, gloo on CPU) on loopback.
    from r1zero.train.dist import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))

    from r1zero import telemetry

    tcfg = base.telemetry.model_copy(update={"enabled": True, "serve": True, "port": 0, "bind": "127.0.0.1",
                                             "pushgateway": None})
    tel = telemetry.start(tcfg, job="gpu-check", rank=0, stage="gpu-check", local_rank=0,
                          flops_per_token=flops_per_token(base), peak_flops=peak)
    phases = report["phases"]
    t_all = time.perf_counter()
    with Scraper(tel.url) as scraper:
        if data is None:
            with Phase("data", cuda) as ph:
                from r1zero.data.mix import run_mix

                dcfg = load_config(config, [*overrides, *(CPU_DATA_OVERRIDES if cpu else DATA_OVERRIDES)])
                run_mix(dcfg, str(out / "data"))
                data = str(out / "data")
            phases["data"] = ph.record
        with Phase("pretrain_bf16", cuda) as ph:
            _pretrain(base, data, out / "pretrain", ph.record, peak)
            tel.observe_step(ph.record.get("seconds") or time.perf_counter() - ph.t0, tokens=0)
        phases["pretrain_bf16"] = ph.record
        ph.record["planner_bytes"] = planner_estimate_bytes(base, device_name)
        if ph.record.get("peak_memory_bytes") and ph.record["planner_bytes"]:
            ph.record["measured_over_planner"] = round(ph.record["peak_memory_bytes"] / ph.record["planner_bytes"], 3)

        hopper = bool(capability and capability >= (9, 0))
        if hopper:
            with Phase("pretrain_fp8", cuda) as ph:
                fcfg = load_config(config, [*overrides, "pretrain.precision=fp8"])
                _pretrain(fcfg, data, out / "pretrain-fp8", ph.record, peak)
                bf16 = phases["pretrain_bf16"].get("tokens_per_s")
                if bf16 and ph.record.get("tokens_per_s"):
                    ph.record["speedup_vs_bf16"] = round(ph.record["tokens_per_s"] / bf16, 3)
            phases["pretrain_fp8"] = ph.record
        else:
            phases["pretrain_fp8"] = {"phase": "pretrain_fp8", "ok": None,
                                      "skipped": f"fp8 needs Hopper (capability >= 9.0); this is {device_name}"}

        with Phase("grpo", cuda) as ph:
            from r1zero.grpo.trainer import run_grpo

            s = run_grpo(base, str(out / "pretrain"), data, str(out / "grpo")) or {}
            steps = s.get("steps") or 0
            ph.record.update(steps=steps, completion_tokens=s.get("completion_tokens"), elapsed_s=s.get("elapsed_s"),
                             seconds_per_step=round(s["elapsed_s"] / steps, 3) if steps and s.get("elapsed_s") else None)
            if not s.get("steps"):
                ph.record["ok"] = False
        phases["grpo"] = ph.record

        with Phase("eval", cuda) as ph:
            from r1zero.eval.evaluate import run_eval

            flat = run_eval(base, str(out / "grpo"), data, str(out / "eval")) or {}
            ph.record.update(pass_at_1=flat.get("accuracy"), format_rate=flat.get("format_rate"))
        phases["eval"] = ph.record

        with Phase("telemetry", cuda) as ph:
            _comm_probe(tel, cuda)
    m = scraper.maxima
    ph.record.update(scrapes=scraper.scrapes, gpu_utilization_max=m.get("r1zero_gpu_utilization_ratio"),
                     gpu_memory_used_max_bytes=m.get("r1zero_gpu_memory_used_bytes"),
                     comm_time_ratio=m.get("r1zero_comm_time_ratio"), mfu_gauge=m.get("r1zero_mfu_ratio"))
    if cuda and ph.record["gpu_utilization_max"] is None:
        ph.record["ok"] = False
        ph.record["error"] = "the exporter served no r1zero_gpu_utilization_ratio series (NVML)"
    phases["telemetry"] = ph.record
    tel.close()
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    report["ok"] = all(p.get("ok") is not False for p in phases.values())
    return report


def _comm_probe(tel, cuda: bool) -> None:
    """All-reduces beside matmuls on the default group, timed by the exporter's comm timer."""
    import torch
    import torch.distributed as dist

    from r1zero.train.dist import free_port

    own = not dist.is_initialized()
    if own:
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    try:
        dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
        n = 4096 if cuda else 256
        a = torch.randn(n, n, device=dev)
        buf = torch.randn(16 * 2**20 if cuda else 2**16, device=dev)
        t0 = time.perf_counter()
        for _ in range(20):
            a = torch.tanh(a @ a)
            dist.all_reduce(buf)
        if cuda:
            torch.cuda.synchronize()
        tel.observe_step(time.perf_counter() - t0, tokens=0)
    finally:
        if own:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="r1zero-gpu-check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu-check-out", help="work directory for the phases' artifacts")
    p.add_argument("--data", default=None, help="an existing data artifact (skips the data phase)")
    p.add_argument("--config", default="configs/tiny.yaml", help="preset the check's overrides start from")
    p.add_argument("--cpu-dry-run", action="store_true", help="run every phase on the CPU at toy size")
    args = p.parse_args(argv)
    try:
        import torch

        if not args.cpu_dry_run and not torch.cuda.is_available():
            raise UserError("gpu-check needs a CUDA device and torch.cuda.is_available() is False here; "
                            f"on one GPU it would run {plan_of_work(False)} (--cpu-dry-run runs it at toy size here)")
        if args.data is not None and not Path(args.data).is_dir():
            raise UserError(f"--data {args.data}: no such data artifact directory")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = run_check(out, args.data, args.cpu_dry_run, args.config)
    except UserError as err:
        print(f"r1zero gpu-check: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report, sort_keys=True, default=str), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
