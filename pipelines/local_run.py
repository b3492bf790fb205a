"""Run the r1zero pipeline definition end to end through ``kfp.local`` on this machine.

    r1zero run --config configs/tiny.yaml --out runs/tiny

Every task runs as a subprocess with this interpreter (``SubprocessRunner(use_venv=False)``), so
the installed r1zero is what runs. ``--runner docker`` runs every task as a container of the
runtime image instead (kfp.local's ``DockerRunner``; settings and checks in
:mod:`r1zero.cluster.docker_runner`): build it first with ``python -m r1zero.images build``. Artifacts land under ``OUT/kfp/<run>/<task>/``; the summary,
the HTML reports and the insight plots are copied to the top of ``OUT`` and a table is printed.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
import warnings
from pathlib import Path

from r1zero.errors import UserError


def _latest_run_dir(kfp_root: Path) -> Path:
    runs = sorted((p for p in kfp_root.glob("r1zero-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UserError(f"kfp.local produced no run directory under {kfp_root}")
    return runs[-1]


def _find(run_dir: Path, task: str, output: str) -> Path:
    p = run_dir / task / output
    if not p.exists():
        raise UserError(f"pipeline output missing: {task}/{output}")
    return p


def collect(run_dir: Path, out: Path) -> dict:
    """Copy the run's human-facing outputs to ``out`` and return summary.json's content."""
    summary_dir = _find(run_dir, "summarize", "summary")
    summary = json.loads((summary_dir / "summary.json").read_text())
    shutil.copy2(summary_dir / "summary.json", out / "summary.json")
    for task, name in [("evaluate", "report-base.html"), ("evaluate-2", "report.html")]:
        src = run_dir / task / "report"
        if src.is_file():
            shutil.copy2(src, out / name)
    ins = run_dir / "detect-insight" / "result"
    if ins.is_dir():
        shutil.copytree(ins, out / "insights", dirs_exist_ok=True)
    summary["artifacts"] = str(run_dir)
    return summary


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()

    def fmt(acc, ci):
        if acc is None:
            return "n/a"
        return f"{acc:.3f}" + (f"  [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    t = Table(title="r1zero run: greedy pass@1 on the held-out split (95% bootstrap CI)")
    t.add_column("model")
    t.add_column("accuracy")
    t.add_column("format rate")
    t.add_column("accuracy among formatted")
    for label, key in (("base", "base"), ("RL (GRPO)", "rl")):
        t.add_row(label, fmt(s[f"{key}_accuracy"], s.get(f"{key}_ci")), _num(s[key].get("format_rate")),
                  _num(s[key].get("accuracy_formatted")))
    console.print(t)
    if s.get("benchmarks"):  # eval.benchmarks, each evaluated whole
        b = Table(title="named benchmarks: greedy pass@1 (95% bootstrap CI)")
        for col in ("benchmark", "n", "base", "RL (GRPO)", "RL - base"):
            b.add_column(col)
        for name, r in s["benchmarks"].items():
            base = r.get("base") or {}
            b.add_row(name, str(r["rl"].get("n")), fmt(base.get("accuracy"), base.get("ci")),
                      fmt(r["rl"].get("accuracy"), r["rl"].get("ci")), _num(r.get("improvement")))
        console.print(b)
    e = Table(title=f"insight events ({len(s['events'])})")
    for col in ("kind", "metric", "step", "before -> after", "score"):
        e.add_column(col)
    for ev in s["events"]:
        e.add_row(ev["kind"], ev["metric"], f"{ev['step']:g}", f"{_num(ev.get('before'))} -> {_num(ev.get('after'))}",
                  _num(ev.get("score")))
    console.print(e)
    st = Table(title="stage durations")
    st.add_column("stage")
    st.add_column("seconds", justify="right")
    for k, v in s["stage_seconds"].items():
        st.add_row(k, f"{v:.1f}")
    st.add_row("total (stages)", f"{s['total_seconds']:.1f}")
    if "wall_seconds" in s:
        st.add_row("wall (incl. kfp.local)", f"{s['wall_seconds']:.1f}")
    console.print(st)


RUNNERS = ("subprocess", "docker")
# the tiny preset shrunk to about a minute per run on 2 cores (a few pretraining and GRPO steps, short
# generations, a small eval split): the runner tests and benchmarks/bench_runners.py run it
SMOKE_SETS = ["data.n_train=400", "data.n_eval=16", "data.tokenizer_rows=400", "pretrain.steps=5",
              "pretrain.micro_batch=4", "pretrain.seq_len=64", "pretrain.warmup_steps=1", "pretrain.log_every=1",
              "pretrain.heldout_per_domain=0", "grpo.steps=2", "grpo.prompts_per_step=4", "grpo.group_size=4",
              "grpo.max_new_tokens=16", "grpo.eval_every=1", "grpo.eval_problems=4", "eval.k=2",
              "eval.n_samples=2", "eval.max_new_tokens=16"]


def _runner(kind: str, out: Path, kfp_root: Path, registry_uri: str, run_token: str):
    """kfp.local's runner: this interpreter, or containers of the runtime image as its non-root uid."""
    from kfp import local

    if kind == "subprocess":
        return local.SubprocessRunner(use_venv=False)
    if kind != "docker":
        raise UserError(f"unknown runner {kind!r}: one of {', '.join(RUNNERS)}")
    from r1zero import store
    from r1zero.cluster.docker_runner import container_run_args, preflight, prepare_dirs
    from r1zero.images import RUNTIME_IMAGE

    preflight(RUNTIME_IMAGE)
    dirs = [out, kfp_root]
    if registry_uri and not store.is_s3(registry_uri):
        dirs.append(Path(registry_uri).resolve())
    prepare_dirs(*dirs)
    # out holds kfp_root (mounted by kfp.local) and the default registry
    mounts = [out] + [d for d in dirs[2:] if not d.is_relative_to(out)]
    return local.DockerRunner(**container_run_args(mounts, run_token))


def run_local(cfg, out: Path, registry_uri: str | None = None, warm_start: bool = False,
              runner: str = "subprocess") -> dict:
    from kfp import local

    from pipelines.r1zero_pipeline import r1zero_pipeline

    out = Path(out).resolve()
    kfp_root = out / "kfp"
    registry_uri = registry_uri if registry_uri is not None else str(out / "registry")
    run_token = uuid.uuid4().hex
    task_runner = _runner(runner, out, kfp_root, registry_uri, run_token)  # checks the engine and image first
    out.mkdir(parents=True, exist_ok=True)
    local.init(runner=task_runner, pipeline_root=str(kfp_root), raise_on_error=True)
    config_yaml = cfg.to_yaml()  # the one serialisation (r1zero.config)
    (out / "config.yaml").write_text(config_yaml)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # The runtime image name has no "python" in it; kfp.local warns about that for every task.
        warnings.simplefilter("ignore", RuntimeWarning)
        # kfp.local ignores display names (and other cluster-only settings) by design.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            r1zero_pipeline(config_yaml=config_yaml, target="local",
                            registry_uri=registry_uri,
                            warm_start=warm_start)
        except RuntimeError as err:
            raise UserError(f"pipeline failed: {str(err).strip().splitlines()[0]}") from None
        finally:
            if runner == "docker":  # Ctrl-C: the running task's container would go on
                from r1zero.cluster.docker_runner import remove_containers

                remove_containers(run_token)
    summary = collect(_latest_run_dir(kfp_root), out)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    print_summary(summary)
    print(f"run directory: {out}  (summary.json, report.html, insights/)")
    return summary
