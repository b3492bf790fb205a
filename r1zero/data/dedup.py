"""Exact and near-duplicate detection with compact, streaming state.

- Exact: an 8-byte BLAKE2b hash of the normalised text (casefolded, tokenised into words and
  symbols, sentence punctuation dropped -- so "What is 2+3?" == "what is 2 + 3").
- Near: MinHash over word n-gram shingles (``dedup.shingle`` tokens) with LSH banding
  (Broder 1997; Leskovec et al., *Mining of Massive Datasets* ch. 3). The signature is computed
  vectorised with numpy for a whole batch and is bit-for-bit datasketch's default ``affine32``
  scheme (murmur3 ``fmix32`` pre-mix, then ``a*h + b mod 2^32`` with datasketch's seeded
  permutations) for the shingle hashes of :meth:`MinHasher.shingle_hashes` -- the tests check this
  against ``datasketch.MinHash``. Bands/rows come from ``datasketch.lsh._optimal_param`` (as
  ``MinHashLSH`` picks them, with recall-favouring weights :data:`LSH_WEIGHTS`). A band collision
  with an earlier row makes it a *candidate*, as a ``MinHashLSH.query`` hit would; it is a near
  duplicate when a candidate's estimated Jaccard (equal signature positions) reaches the
  threshold (see :class:`DedupIndex` for why).
- State: sorted ``uint64`` arrays in LSM-style runs (:class:`HashIndex`, :class:`KeyedIndex`) and
  one ``uint32`` signature row per kept row: 8 bytes per exact key, 12 per band key (+ row id),
  4 * num_perm per row: ~370 bytes per kept row at 64 permutations and 9 bands; no Python objects.

Tensor names carry their shape: C = rows in a batch, W = shingles (windows) in a batch,
P = permutations, B = bands, R = rows per band.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np

# Words, and single symbols except sentence punctuation: that carries no meaning for duplicate
# detection, while math/code symbols (+ - * / = % ( ) [ ] < >) do, so they stay.
_TOKEN_RE = re.compile(r"\w+|[^\w\s.,;:!?\"'`]")


# (false-positive, false-negative) weights for datasketch's LSH parameter search. Candidates are
# verified by their Jaccard estimate, so false positives only cost a comparison: favour recall.
# At threshold 0.8 / 64 permutations this gives 9 bands x 7 rows: a pair at J = 0.8 collides with
# p = 0.88, at J = 0.9 with p = 0.997 (datasketch's default (0.5, 0.5) gives 0.36 and 0.85).
LSH_WEIGHTS = (0.1, 0.9)


def tokens(text: str) -> list[str]:
    """Normalised tokens: NFKC, casefold, words and single symbols, sentence punctuation dropped."""
    norm = unicodedata.normalize("NFKC", text).casefold()
    return _TOKEN_RE.findall(norm)


def normalise(text: str) -> str:
    return " ".join(tokens(text))


def exact_key(text: str) -> int:
    """8-byte hash of the normalised text."""
    return int.from_bytes(hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=8).digest(), "little")


_tok_cache: dict[str, int] = {}


def token_hash(tok: str) -> int:
    """crc32 of a token (deterministic across processes, unlike ``hash``)."""
    return zlib.crc32(tok.encode("utf-8"))


def token_hashes(rows_tokens: list[list[str]]) -> list[list[int]]:
    """:func:`token_hash` of every token of every row, via a bounded cache (vocabularies repeat)."""
    cache = _tok_cache
    if len(cache) > 200_000:  # bounded (~20 MB); numbers make the token vocabulary open-ended
        cache.clear()
    for toks in rows_tokens:
        for t in toks:
            if t not in cache:
                cache[t] = zlib.crc32(t.encode("utf-8"))
    get = cache.__getitem__
    return [list(map(get, toks)) for toks in rows_tokens]


def _fmix32(h_W: np.ndarray) -> np.ndarray:
    """MurmurHash3 32-bit finaliser (Appleby 2011), as datasketch's ``_fmix(hv, 32)``."""
    h_W = h_W ^ (h_W >> np.uint32(16))
    h_W = h_W * np.uint32(0x85EBCA6B)
    h_W = h_W ^ (h_W >> np.uint32(13))
    h_W = h_W * np.uint32(0xC2B2AE35)
    return h_W ^ (h_W >> np.uint32(16))


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 64-bit finaliser (Appleby 2011)."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


class MinHasher:
    """Batched MinHash signatures and LSH band keys (see the module docstring)."""

    def __init__(self, num_perm: int = 64, shingle: int = 5, threshold: float = 0.8, seed: int = 1):
        from datasketch import MinHash
        from datasketch.lsh import _optimal_param

        self.num_perm, self.shingle, self.threshold = num_perm, shingle, threshold
        perm = MinHash(num_perm=num_perm, seed=seed).permutations  # datasketch's affine32 (a, b)
        self.a_P = perm[0].astype(np.uint32)
        self.b_P = perm[1].astype(np.uint32)
        self.bands, self.rows_per_band = _optimal_param(threshold, num_perm, *LSH_WEIGHTS)
        rng = np.random.default_rng(0x5EED)
        self._shingle_mult = rng.integers(1, 1 << 63, size=shingle, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._band_mult_BR = rng.integers(1, 1 << 63, size=(self.bands, self.rows_per_band), dtype=np.uint64)
        self._band_salt_B = rng.integers(0, 1 << 63, size=self.bands, dtype=np.uint64)

    def shingle_hashes(self, token_hashes: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hashes of every n-token window of every row, and each row's first window index.

        A row shorter than ``shingle`` tokens has one window: all of its tokens.
        """
        lens_C = np.fromiter((len(t) for t in token_hashes), dtype=np.int64, count=len(token_hashes))
        flat = np.fromiter((h for t in token_hashes for h in t), dtype=np.uint64, count=int(lens_C.sum()))
        if flat.size == 0:
            flat = np.zeros(1, dtype=np.uint64)
        row_start_C = np.concatenate([[0], np.cumsum(lens_C)[:-1]]).astype(np.int64)
        wins_C = np.maximum(1, lens_C - self.shingle + 1)
        win_start_C = np.concatenate([[0], np.cumsum(wins_C)[:-1]]).astype(np.int64)
        n_win = int(wins_C.sum())
        row_of_W = np.repeat(np.arange(len(lens_C)), wins_C)
        pos_W = row_start_C[row_of_W] + (np.arange(n_win) - win_start_C[row_of_W])
        end_W = (row_start_C + lens_C)[row_of_W]
        acc_W = np.zeros(n_win, dtype=np.uint64)
        for j in range(self.shingle):
            idx_W = pos_W + j
            valid_W = idx_W < end_W
            acc_W += np.where(valid_W, flat[np.minimum(idx_W, flat.size - 1)] * self._shingle_mult[j], np.uint64(0))
        acc_W = _fmix64(acc_W)
        return (acc_W >> np.uint64(32)).astype(np.uint32), win_start_C

    def signatures(self, token_hashes: list[list[int]]) -> np.ndarray:
        """MinHash signatures, shape (C, P) uint32 (datasketch ``affine32`` hashvalues)."""
        if not token_hashes:
            return np.zeros((0, self.num_perm), dtype=np.uint32)
        hv_W, win_start_C = self.shingle_hashes(token_hashes)
        hv_W = _fmix32(hv_W)
        # (P, W) layout with an explicit output buffer: contiguous reduceat along W is ~5x faster
        # than (W, P) here. uint32 arithmetic wraps mod 2^32 by design (affine32 scheme).
        phv_PW = np.empty((self.num_perm, hv_W.size), dtype=np.uint32)
        np.multiply(self.a_P[:, None], hv_W[None, :], out=phv_PW)
        phv_PW += self.b_P[:, None]
        return np.ascontiguousarray(np.minimum.reduceat(phv_PW, win_start_C, axis=1).T)

    def band_keys(self, sig_CP: np.ndarray) -> np.ndarray:
        """One uint64 key per (row, band): a multilinear hash of the band's values, band-salted."""
        c = sig_CP.shape[0]
        used = self.bands * self.rows_per_band
        sig_CBR = sig_CP[:, :used].astype(np.uint64).reshape(c, self.bands, self.rows_per_band)
        key_CB = (sig_CBR * self._band_mult_BR[None]).sum(axis=2, dtype=np.uint64) + self._band_salt_B[None]
        return _fmix64(key_CB)


class HashIndex:
    """A growing set of uint64 keys as a few sorted runs (LSM-style merges keep ~log2(N) runs)."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        """Stored keys (a key added again later may sit in two runs until they merge)."""
        return sum(r.size for r in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runs)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Elementwise membership of ``keys`` (any shape) -> bool array of the same shape."""
        keys = np.asarray(keys, dtype=np.uint64)
        hit = np.zeros(keys.shape, dtype=bool)
        for run in self.runs:
            pos = np.searchsorted(run, keys)
            hit |= run[np.minimum(pos, run.size - 1)] == keys
        return hit

    def add(self, keys: np.ndarray) -> None:
        new = np.unique(np.asarray(keys, dtype=np.uint64).ravel())
        if new.size == 0:
            return
        self.runs.append(new)
        while len(self.runs) > 1 and self.runs[-2].size <= 2 * self.runs[-1].size:
            top = self.runs.pop()
            self.runs[-1] = np.union1d(self.runs[-1], top)


class KeyedIndex:
    """uint64 keys -> int32 row ids (duplicates allowed), as sorted runs merged LSM-style."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(k.size for k, _ in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.runs)

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        keys, ids = np.asarray(keys, dtype=np.uint64).ravel(), np.asarray(ids, dtype=np.int32).ravel()
        if keys.size == 0:
            return
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], ids[order]))
        while len(self.runs) > 1 and self.runs[-2][0].size <= 2 * self.runs[-1][0].size:
            k2, v2 = self.runs.pop()
            k1, v1 = self.runs[-1]
            k, v = np.concatenate([k1, k2]), np.concatenate([v1, v2])
            order = np.argsort(k, kind="stable")
            self.runs[-1] = (k[order], v[order])

    def lookup(self, keys_CB: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidate pairs ``(row, id)``: ``id`` is stored under one of row ``row``'s keys.

        At most ``cap`` ids per key and run (bounded work on crowded keys); pairs may repeat.
        """
        flat = keys_CB.ravel()
        order = np.argsort(flat, kind="stable")  # sorted needles: cache-friendly binary searches
        needles = flat[order]
        rows_out, ids_out = [], []
        for run_k, run_v in self.runs:
            lo = np.searchsorted(run_k, needles, side="left")
            hit = run_k[np.minimum(lo, run_k.size - 1)] == needles
            if not hit.any():
                continue
            lo, row = lo[hit], order[hit] // keys_CB.shape[1]
            n = np.minimum(np.searchsorted(run_k, needles[hit], side="right"), lo + cap) - lo
            # expand each [lo, lo + n) range into its positions
            pos = np.repeat(lo - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
            rows_out.append(np.repeat(row, n))
            ids_out.append(run_v[pos])
        if not rows_out:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
        return np.concatenate(rows_out), np.concatenate(ids_out)


class SignatureStore:
    """MinHash signatures of kept rows, row id -> (P,) uint32, in a doubling buffer."""

    def __init__(self, num_perm: int) -> None:
        self.buf = np.zeros((1024, num_perm), dtype=np.uint32)
        self.n = 0

    @property
    def nbytes(self) -> int:
        return self.n * self.buf.shape[1] * 4

    def add(self, sig_CP: np.ndarray) -> np.ndarray:
        """Append signatures; return their ids."""
        c = sig_CP.shape[0]
        if self.n + c > self.buf.shape[0]:
            grown = np.zeros((max(2 * self.buf.shape[0], self.n + c), self.buf.shape[1]), dtype=np.uint32)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n:self.n + c] = sig_CP
        ids = np.arange(self.n, self.n + c, dtype=np.int64)
        self.n += c
        return ids

    def __getitem__(self, ids) -> np.ndarray:
        return self.buf[ids]


def batch_near_pairs(sig_CP: np.ndarray, bands_CB: np.ndarray, threshold: float, cap: int,
                     pair_slice: int = 1 << 17) -> list[list[int]]:
    """Within one batch: for each row j, the earlier rows i < j that are near duplicates of it.

    Candidates are rows sharing an LSH band key with j, limited to the first ``cap`` rows holding
    that key (bounded work, as in :class:`DedupIndex`); a candidate counts when the estimated
    Jaccard reaches ``threshold``. Vectorised: sort (key, row), expand each row's preceding
    same-key rows into pairs, compare signatures in slices.
    """
    c, b = bands_CB.shape
    out: list[list[int]] = [[] for _ in range(c)]
    if c < 2:
        return out
    keys = bands_CB.ravel()
    rows = np.repeat(np.arange(c, dtype=np.int64), b)
    order = np.lexsort((rows, keys))
    ks, rs = keys[order], rows[order]
    pos = np.arange(ks.size)
    new_group = np.concatenate([[True], ks[1:] != ks[:-1]])
    g0 = np.maximum.accumulate(np.where(new_group, pos, 0))  # start of each element's key group
    n = np.minimum(pos - g0, cap)  # earlier same-key rows examined for this element
    if not n.any():
        return out
    j = np.repeat(rs, n)
    i = rs[np.repeat(g0 - np.cumsum(n) + n, n) + np.arange(int(n.sum()))]
    pair = np.unique(i * c + j)  # the same pair can share several bands
    i, j = pair // c, pair % c
    need = int(np.ceil(threshold * sig_CP.shape[1] - 1e-9))
    for s in range(0, pair.size, pair_slice):
        ii, jj = i[s:s + pair_slice], j[s:s + pair_slice]
        ok = np.count_nonzero(sig_CP[ii] == sig_CP[jj], axis=1) >= need
        for a, z in zip(ii[ok].tolist(), jj[ok].tolist()):
            out[z].append(a)
    return out


class DedupIndex:
    """Exact keys, LSH band keys (-> row ids) and signatures of the rows kept so far in one split.

    A near duplicate is an LSH candidate whose estimated Jaccard similarity is >= the threshold:
    band collisions alone over-flag templated text, whose many moderately similar neighbours
    (J ~ 0.6) each collide with a few percent probability.
    """

    # Candidates examined per band key and run. Templated text can pile thousands of rows onto one
    # key; the cap bounds the work, at the cost of missing a near duplicate that sits beyond the
    # first 64 rows of a crowded key in every band it shares (a recall trade-off).
    CAND_CAP = 64
    PAIR_SLICE = 1 << 17  # candidate pairs compared at once (x num_perm x 4 bytes of temporaries)

    def __init__(self, num_perm: int) -> None:
        self.exact = HashIndex()
        self.bands = KeyedIndex()
        self.sigs = SignatureStore(num_perm)

    def near_hits(self, sig_CP: np.ndarray, bands_CB: np.ndarray, threshold: float) -> np.ndarray:
        """bool (C,): whether each row is a near duplicate of a row already in the index."""
        hit_C = np.zeros(sig_CP.shape[0], dtype=bool)
        rows, ids = self.bands.lookup(bands_CB, self.CAND_CAP)
        need = int(np.ceil(threshold * sig_CP.shape[1] - 1e-9))  # equal positions for J >= threshold
        for s in range(0, rows.size, self.PAIR_SLICE):
            r, i = rows[s:s + self.PAIR_SLICE], ids[s:s + self.PAIR_SLICE]
            equal = np.count_nonzero(sig_CP[r] == self.sigs[i], axis=1)
            hit_C[r[equal >= need]] = True
        return hit_C

    def add(self, ekeys_C: np.ndarray, sig_CP: np.ndarray, bands_CB: np.ndarray) -> None:
        self.exact.add(ekeys_C)
        ids = self.sigs.add(sig_CP)
        self.bands.add(bands_CB, np.repeat(ids, bands_CB.shape[1]))

    def stats(self) -> dict:
        return {"exact_keys": len(self.exact), "band_keys": len(self.bands),
                "bytes": self.exact.nbytes + self.bands.nbytes + self.sigs.nbytes}
