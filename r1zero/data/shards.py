"""Shard writing and reading for the data artifact (``train/``, ``eval/``, ``quarantine/``,
``bench/<name>/`` for each named benchmark).

Writers stream: rows are buffered up to a row group and written, and a new ``part-NNNNN`` file
starts every ``shard_rows`` rows, so memory stays flat whatever the size. Output bytes depend only
on the rows (no timestamps: gzip ``mtime=0``; Parquet's footer holds only the writer version).

    from r1zero.data.shards import iter_rows, read_rows
    for row in iter_rows("runs/tiny/data", "train"): ...
    rows = read_rows("s3://bucket/data", "eval")   # URIs are materialised first
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from r1zero import store
from r1zero.data.schema import FIELDS
from r1zero.errors import UserError

SPLITS = ("train", "eval", "quarantine")
BENCH = "bench/"  # named benchmarks (eval.benchmarks): bench/<name>/part-*


def bench_split(name: str) -> str:
    """The split holding the named benchmark ``name``'s rows."""
    return BENCH + name
_ROW_GROUP = 8192  # rows per Parquet row group / write batch: bounded memory, good scan speed


class ShardWriter:
    """Append rows to ``<root>/<split>/part-NNNNN.<ext>`` files of at most ``shard_rows`` rows."""

    def __init__(self, root: str | Path, split: str, schema: pa.Schema, shard_rows: int, fmt: str = "parquet"):
        if fmt not in ("parquet", "jsonl.gz"):
            raise UserError(f"unknown shard format {fmt!r} (parquet or jsonl.gz)")
        self.dir = Path(root) / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split, self.schema, self.shard_rows, self.fmt = split, schema, shard_rows, fmt
        self.names = [f.name for f in schema]
        self.buf: list[dict] = []
        self.files: list[tuple[str, int]] = []  # (relative path, rows)
        self.rows = 0
        self._writer = None
        self._in_shard = 0

    def _open(self) -> None:
        path = self.dir / f"part-{len(self.files):05d}.{self.fmt}"
        if self.fmt == "parquet":
            self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        else:
            self._raw = open(path, "wb")  # noqa: SIM115 - closed in _close_shard
            self._writer = gzip.GzipFile(fileobj=self._raw, mode="wb", mtime=0, filename="")
        self.files.append((f"{self.split}/{path.name}", 0))
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        if self.fmt == "jsonl.gz":
            self._raw.close()
        rel, _ = self.files[-1]
        self.files[-1] = (rel, self._in_shard)
        self._writer = None

    def _flush(self) -> None:
        while self.buf:
            if self._writer is None:
                self._open()
            room = self.shard_rows - self._in_shard
            chunk, self.buf = self.buf[:room], self.buf[room:]
            if self.fmt == "parquet":
                cols = {n: [r[n] for r in chunk] for n in self.names}
                self._writer.write_table(pa.table(cols, schema=self.schema))
            else:
                data = "".join(json.dumps({n: r[n] for n in self.names}, ensure_ascii=False, sort_keys=True) + "\n"
                               for r in chunk)
                self._writer.write(data.encode("utf-8"))
            self._in_shard += len(chunk)
            if self._in_shard >= self.shard_rows:
                self._close_shard()

    def write(self, row: dict) -> None:
        self.buf.append(row)
        self.rows += 1
        if len(self.buf) >= _ROW_GROUP:
            self._flush()

    def close(self) -> list[tuple[str, int]]:
        self._flush()
        self._close_shard()
        return self.files


def _split_files(root: Path, split: str) -> list[Path]:
    d = root / split
    if not d.is_dir():
        raise UserError(f"data artifact {root}: no {split}/ directory (is it the output of `r1zero data mix`?)")
    return sorted(p for p in d.iterdir() if p.name.startswith("part-") and p.name.endswith((".parquet", ".jsonl.gz")))


def iter_rows(data_dir: str | Path, split: str) -> Iterator[dict]:
    """Stream the rows of ``split`` (train|eval|quarantine) from a data artifact dir or URI."""
    if split not in SPLITS and not (split.startswith(BENCH) and "/" not in split[len(BENCH):]):
        raise UserError(f"unknown split {split!r} (one of {', '.join(SPLITS)}, or bench/<name>)")
    root = store.materialize(str(data_dir))
    for path in _split_files(Path(root), split):
        # a truncated/corrupt shard or one without the row schema's columns is bad input, not a bug
        try:
            if path.name.endswith(".parquet"):
                pf = pq.ParquetFile(path)
                _check_columns(path, pf.schema_arrow.names)
                for batch in pf.iter_batches(batch_size=_ROW_GROUP):
                    yield from batch.to_pylist()
            else:
                with gzip.open(path, "rb") as f:
                    for line in io.TextIOWrapper(f, encoding="utf-8"):
                        row = json.loads(line)
                        _check_columns(path, row)
                        yield row
        except (pa.ArrowException, OSError, EOFError, ValueError) as err:  # JSON/UTF-8 errors are ValueErrors
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UserError(f"data shard {split}/{path.name} in {data_dir} is unreadable: {first}") from None


def _check_columns(path: Path, names) -> None:
    missing = [f for f in FIELDS if f not in names]
    if missing:
        raise UserError(f"data shard {path.parent.name}/{path.name} lacks the row schema's column(s) "
                        f"{', '.join(missing)}")


def read_rows(data_dir: str | Path, split: str) -> list[dict]:
    """All rows of ``split`` as a list (small splits; use :func:`iter_rows` to stream)."""
    return list(iter_rows(data_dir, split))
