"""Atomic, sharded, checksummed training checkpoints on local disk or S3, keep-last-N.

    ckpt = Checkpointer(root_uri, keep_last=2)
    ckpt.save(step, write_shards=lambda d: engine.save_checkpoint(d, tag="engine"), state={...})
    found = ckpt.load_latest()        # -> LoadedCheckpoint(step, path, state) or None

Layout of one checkpoint ``<root>/step-00000100/``:
- ``engine/``: the engine's ``torch.distributed.checkpoint`` directory (every rank writes only its
  own shards, ``__<rank>_<n>.distcp``; rank 0 the ``.metadata``),
- ``rng-rank00001.pt`` per rank (python/numpy/torch RNG state),
- ``trainer_state.json`` (step, data position, config hash),
- ``MANIFEST.json`` written LAST by rank 0: sha256 and size of every file.

A checkpoint without a manifest (crash mid-save) or whose files do not match their checksums
(truncated/corrupt) is skipped with a warning and the previous one is used.

Atomicity: locally, ranks write into ``<root>/.tmp-step-00000100`` and rank 0 renames it to its
final name after the manifest is written (one ``os.replace``). On S3 each rank uploads its files
with a server-verified SHA-256 (``r1zero.store.write_bytes``) and the manifest goes last, so a
reader that finds the manifest finds every file. Every file has one owner rank (the rank that
wrote it: ``__<rank>_*.distcp`` and ``rng-rank<rank>.pt``; rank 0 for the rest), which alone hashes
and uploads it, streamed (boto3's managed multipart transfer: no file held whole in memory, objects
over 5 GB), so each shard goes up exactly once however many ranks share a node's staging dir.
Ranks on one node share the staging dir; several nodes need S3 (or a shared filesystem), as on
Kubernetes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from r1zero import store
from r1zero.train import dist as rdist

MANIFEST = "MANIFEST.json"
STATE = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d{8})$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------------------------
# collectives (r1zero.train.dist; no-ops in a world of one)


def _world() -> tuple[int, int]:
    return rdist.world()


def _barrier() -> None:
    rdist.barrier()


def _gather_dicts(d: dict) -> dict:
    merged: dict = {}
    for part in rdist.all_gather_object(d):
        merged.update(part)
    return merged


def _broadcast(obj):
    return rdist.broadcast_object(obj)


_RANK_FILE = (re.compile(r"__(\d+)_\d+\.distcp$"), re.compile(r"rng-rank(\d+)\.pt$"), re.compile(r"rank-(\d+)\.pt$"))


def owner_rank(rel: str) -> int:
    """The rank that wrote (and alone hashes and uploads) the checkpoint file ``rel``."""
    for pattern in _RANK_FILE:
        m = pattern.search(rel)
        if m:
            return int(m.group(1))
    return 0


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    path: Path  # local directory holding the verified files
    state: dict


def verify_dir(path: Path, manifest: dict) -> str | None:
    """None when every file of ``manifest`` is present with its size and sha256, else the problem."""
    for rel, meta in sorted(manifest["files"].items()):
        p = path / rel
        if not p.is_file():
            return f"{rel} missing"
        if p.stat().st_size != meta["size"]:
            return f"{rel} truncated ({p.stat().st_size} of {meta['size']} bytes)"
        if store.sha256_file(p) != meta["sha256"]:
            return f"{rel} checksum mismatch"
    return None


class Checkpointer:
    def __init__(self, root_uri: str, keep_last: int = 2, staging_root: str | Path | None = None):
        self.root = str(root_uri)
        self.keep_last = keep_last
        self.remote = store.is_s3(self.root)
        self._staging_root = Path(staging_root) if staging_root else None

    # -- listing ---------------------------------------------------------------------------
    def _list_steps(self) -> list[int]:
        if self.remote:
            bucket, prefix = store.split_s3(self.root)
            client = store.s3_client()
            pfx = f"{prefix}/" if prefix else ""
            steps = set()
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=pfx, Delimiter="/"):
                for cp in page.get("CommonPrefixes", []):
                    m = _STEP_RE.match(cp["Prefix"][len(pfx):].strip("/"))
                    if m:
                        steps.add(int(m.group(1)))
            return sorted(steps)
        root = store.local_path(self.root)
        if not root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir())

    # -- save ------------------------------------------------------------------------------
    def _staging(self, step: int) -> Path:
        if not self.remote:
            return store.local_path(self.root) / f".tmp-{step_name(step)}"
        base = self._staging_root or (store.cache_dir() / "ckpt-staging")
        key = hashlib.sha256(self.root.encode()).hexdigest()[:12]  # keeps runs apart
        return base / key / step_name(step)

    def save(self, step: int, write_shards: Callable[[Path], None], state: dict) -> str:
        """Collective: every rank calls it. Returns the checkpoint URI."""
        rank, world = _world()
        staging = self._staging(step)
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True, exist_ok=True)
        _barrier()
        staging.mkdir(parents=True, exist_ok=True)  # other nodes' local staging
        try:
            write_shards(staging)
            torch.save(rng_state(), staging / f"rng-rank{rank:05d}.pt")
            if rank == 0:
                store.atomic_write_text(staging / STATE, json.dumps({**state, "step": step, "world_size": world},
                                                                     sort_keys=True, indent=1))
        except BaseException as err:  # DCP's CheckpointException derives from BaseException
            # disk full: one clear line; the staging dir goes (freeing its space), earlier checkpoints stay
            if store.disk_full(err, staging):
                full = store.disk_full_error(staging.parent, f"checkpoint {step_name(step)} not saved (the "
                                             "previous checkpoint is kept)")
                shutil.rmtree(staging, ignore_errors=True)
                raise full from None
            raise
        _barrier()
        # every rank hashes (and for S3 uploads, streamed) only the files it wrote
        mine = {}
        for p in sorted(staging.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                rel = p.relative_to(staging).as_posix()
                if owner_rank(rel) != rank:
                    continue
                mine[rel] = {"sha256": store.sha256_file(p), "size": p.stat().st_size}
                if self.remote:
                    store.upload_file(p, store.join(self.root, step_name(step), rel))
        files = _gather_dicts(mine)
        final_uri = store.join(self.root, step_name(step))
        if rank == 0:
            manifest = json.dumps({"step": step, "files": files}, sort_keys=True, indent=1).encode()
            if self.remote:
                store.write_bytes(store.join(final_uri, MANIFEST), manifest)
            else:
                store.atomic_write_bytes(staging / MANIFEST, manifest)
                final = store.local_path(final_uri)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staging, final)
            self._prune()
        _barrier()
        if self.remote:
            shutil.rmtree(staging, ignore_errors=True)
        return final_uri

    def _prune(self) -> None:
        steps = self._list_steps()
        for old in steps[:-self.keep_last] if len(steps) > self.keep_last else []:
            self.delete(old)

    def delete(self, step: int) -> None:
        if self.remote:
            bucket, prefix = store.split_s3(store.join(self.root, step_name(step)))
            client = store.s3_client()
            keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
                    for o in page.get("Contents", [])]
            # the manifest goes first so that a half-deleted checkpoint is never taken as valid
            keys.sort(key=lambda k: not k.endswith(MANIFEST))
            for k in keys:
                client.delete_object(Bucket=bucket, Key=k)
        else:
            path = store.local_path(store.join(self.root, step_name(step)))
            (path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------
    def _fetch(self, step: int) -> tuple[Path, dict] | tuple[None, str]:
        uri = store.join(self.root, step_name(step))
        try:
            manifest = json.loads(store.read_bytes(store.join(uri, MANIFEST)))
        except Exception as err:  # noqa: BLE001 - any unreadable manifest means "not a checkpoint"
            return None, f"no readable {MANIFEST} ({type(err).__name__})"
        if self.remote:
            local = Path(tempfile.mkdtemp(prefix="r1zero-ckpt-"))
            for rel in manifest["files"]:
                try:
                    store.download_file(store.join(uri, rel), local / rel)
                except Exception as err:  # noqa: BLE001
                    return None, f"{rel} unreadable ({type(err).__name__})"
        else:
            local = store.local_path(uri)
        problem = verify_dir(local, manifest)
        if problem:
            return None, problem
        return local, manifest

    def load_latest(self) -> LoadedCheckpoint | None:
        """Newest checkpoint whose files all verify; rank 0 decides, every rank gets the same answer."""
        rank, _ = _world()
        chosen = None
        if rank == 0:
            for step in reversed(self._list_steps()):
                local, info = self._fetch(step)
                if local is None:
                    warnings.warn(f"checkpoint {step_name(step)} under {self.root} is unusable ({info}); "
                                  "falling back to the previous one", stacklevel=2)
                    continue
                chosen = step
                break
        chosen = _broadcast(chosen)
        if chosen is None:
            return None
        if rank == 0 and not self.remote:
            path = store.local_path(store.join(self.root, step_name(chosen)))
        else:
            path, info = self._fetch(chosen)
            if path is None:
                raise RuntimeError(f"checkpoint {step_name(chosen)} verified on rank 0 but not on rank {rank}: {info}")
        state = json.loads((Path(path) / STATE).read_text())
        return LoadedCheckpoint(step=chosen, path=Path(path), state=state)

    def restore_rng(self, loaded: LoadedCheckpoint) -> None:
        rank, _ = _world()
        set_rng_state(torch.load(loaded.path / f"rng-rank{rank:05d}.pt", weights_only=False))
