"""The pipeline's tasks in the runtime image: what ``r1zero run --runner docker`` gives kfp.local.

    python -m r1zero.images build                                       # the images (make images)
    r1zero run --runner docker --config configs/tiny.yaml --out runs/tiny-docker

kfp.local's ``DockerRunner`` (``pipelines/local_run.py``) starts every task as a container of its
component's image (each component is ``@dsl.component(base_image=RUNTIME_IMAGE)``), running the
component's command (KFP's executor, which calls ``components.runtime`` and so the same ``r1zero``
command line as the pods) with the pipeline root bind-mounted at the same path. This module holds
what r1zero adds around it, without importing kfp (the core's layering, ``pyproject.toml``):

- :func:`preflight`: the engine answers, the image exists, runs as the one non-root uid
  (:data:`r1zero.images.UID`), was built from this source tree (else a one-line warning);
- :func:`prepare_dirs`: the run directories become writable by that uid (the containers run as
  the image's own user, never as the caller's);
- :func:`remove_containers`: an interrupted run leaves no task container running;
- :func:`container_run_args`: the ``containers.run`` arguments of the docker SDK for every task:
  no network, read-only root with a tmpfs /tmp, all capabilities dropped, no privilege
  escalation, the run directory mounted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from r1zero.errors import UserError
from r1zero.images import (
    HASH_LABEL,
    REPO,
    UID,
    docker,
    image_exists,
    image_label,
    image_user,
    inputs_hashes,
    require_engine,
)

# /dev/shm of a task container (docker's default is 64 MiB): torch's CPU collectives and data
# workers use it; the pipeline's pods mount a Memory emptyDir there as well.
SHM_SIZE = "1g"
TMP_SIZE = "2g"  # /tmp (tmpfs, in memory): HOME and the stage's temporary config file
RUN_LABEL = "org.r1zero.local-run"  # on every task container of one `r1zero run --runner docker`
# caller's settings the tasks inherit under the subprocess runner and that change results
FORWARDED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
DOCKER_SDK_PIN = "docker==7.2.0"  # pyproject.toml, dev extra: kfp.local's DockerRunner needs the SDK


def _runs_as_uid(user: str) -> bool:
    """Whether an image's USER ("10001" or "10001:10001"; the Dockerfiles set the number) is :data:`UID`."""
    return user.split(":")[0] == str(UID)


def preflight(image: str, log=lambda m: print(m, file=sys.stderr, flush=True)) -> None:
    """Refuse to start unless ``image`` can run the tasks here; one-line UserErrors naming the fix."""
    try:
        import docker as docker_sdk  # noqa: F401  (kfp.local imports it when the runner is created)
    except ImportError:
        raise UserError(f"--runner docker needs the docker Python SDK: pip install {DOCKER_SDK_PIN}") from None
    require_engine()
    if not image_exists(image):
        raise UserError(f"runtime image {image} not found: build it with `python -m r1zero.images build` "
                        "(make images)")
    user = image_user(image)
    if not _runs_as_uid(user):
        raise UserError(f"image {image} runs as user {user or 'root'!r}, not the non-root uid {UID}: "
                        "rebuild it with `python -m r1zero.images build`")
    if (REPO / "images").is_dir():  # a source checkout: is the image built from it?
        built = image_label(image, HASH_LABEL)
        want = inputs_hashes(REPO)["runtime"]
        if built != want:
            log(f"warning: {image} was built from other sources (inputs {built} != {want}): the tasks run "
                "the image's code; `python -m r1zero.images build` rebuilds it")


def prepare_dirs(*dirs: Path) -> None:
    """Create ``dirs`` and let the image's uid write there.

    As root (the usual Docker host here) the trees are given to :data:`UID`; as another user they
    are opened to everyone (mode 0777), since only root may give files away.
    """
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == UID:
            continue
        if os.geteuid() == 0:
            os.chown(d, UID, UID)
            for root, subdirs, files in os.walk(d):
                for name in subdirs + files:
                    os.chown(os.path.join(root, name), UID, UID, follow_symlinks=False)
        else:
            d.chmod(0o777)


def container_run_args(mount_dirs: list[Path], run_token: str) -> dict:
    """``docker.containers.run`` arguments for every task (kfp.local adds image, command and the
    pipeline root's volume; it refuses those three here). ``run_token`` labels the containers
    (:func:`remove_containers`)."""
    from docker.types import Mount

    return {
        "labels": {RUN_LABEL: run_token},
        # The image's ENTRYPOINT is `r1zero` (for the pods' `r1zero <stage>` args); kfp passes the
        # component's whole command (sh -c ... kfp.dsl.executor_main) as the container's Cmd.
        "entrypoint": [],
        # Every artifact is under the mounted run directory and torch.distributed uses loopback:
        # the tasks need no network (nor does KFP's `pip install kfp`, already satisfied).
        "network_mode": "none",
        # the pods' securityContext (r1zero.cluster.render.security_context): read-only root, no
        # capabilities, no privilege escalation; HOME on a small writable /tmp, as in the pods
        "read_only": True,
        "tmpfs": {"/tmp": f"size={TMP_SIZE}"},
        # no network: the hostname must resolve (torch.distributed's rendezvous looks it up)
        "hostname": "localhost",
        "environment": {"HOME": "/tmp",
                        # thread counts decide CPU reduction order: the same as a subprocess run
                        **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "shm_size": SHM_SIZE,
        # directories outside the pipeline root that tasks write (the promotion gate's registry)
        "mounts": [Mount(target=str(d), source=str(d), type="bind") for d in mount_dirs],
    }


def remove_containers(run_token: str) -> list[str]:
    """Force-remove the task containers of one run still there (an interrupted run: kfp.local
    leaves the running task's container behind, as it auto-removes only containers that exit)."""
    ids = docker("ps", "--all", "--quiet", "--filter", f"label={RUN_LABEL}={run_token}", check=False).stdout.split()
    if ids:
        docker("rm", "--force", *ids, check=False)
    return ids
