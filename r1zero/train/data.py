"""Pretraining data: documents -> token stream -> fixed-length packed sequences, resumable by position.

    docs = build_documents(rows, seed=cfg.seed)                      # list[str]
    packed = PackedSequences.from_texts(docs, tokenizer, seq_len=128, seed=0)
    x_BS = packed.micro_batch(step=7, micro=1, micro_batch=16, n_micro=2)

Packing (GPT-2/HF ``run_clm`` "group_texts"): every document is tokenised, followed by EOS, the
documents are concatenated in a seeded per-epoch order and cut into non-overlapping windows of
``seq_len`` tokens (the tail that does not fill a window is dropped for that epoch). There is no
padding, so every micro-batch has the same number of target tokens and the mean loss of a global
batch equals the mean of its micro-batch losses: this is what makes dp/grad-accumulation layouts
give identical updates.

Position: the sequence index of global batch ``g`` is ``g * global_batch + j``; epoch ``e``
covers sequences ``[e * n_windows, (e + 1) * n_windows)``. The only state to checkpoint is the
number of optimizer steps taken, so resuming reproduces the uninterrupted run exactly.

Micro-batch ``m`` of a global batch (``m = dp_rank * grad_accum + accum_index``) is the slice
``[m * micro_batch, (m + 1) * micro_batch)``: world=1 with grad_accum=2 and dp=2 with grad_accum=1
see the same sequences in the same micro-batches.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from r1zero.errors import UserError


def build_documents(rows: list[dict], seed: int, template_fraction: float = 0.5,
                    reasoning_fraction: float = 1.0, solution_style: str = "plain") -> list[str]:
    """One pretraining document per row, rendered with a seeded RNG (deterministic).

    ``template_fraction`` (``data.template_fraction``) of the task rows use the R1-Zero template,
    the rest plain formats; ``reasoning_fraction`` of the template ones show the worked solution,
    written in ``solution_style`` (:func:`r1zero.data.documents.pretrain_text`).
    """
    from r1zero.data.documents import pretrain_text

    rng = random.Random(seed)
    docs = [pretrain_text(row, rng, template_fraction=template_fraction, reasoning_fraction=reasoning_fraction,
                          solution_style=solution_style) for row in rows]
    return [d for d in docs if d]


def tokenize_documents(texts: list[str], tokenizer) -> list[np.ndarray]:
    """Token ids of each document followed by EOS (int32 arrays)."""
    if tokenizer.eos_token_id is None:
        raise UserError("tokenizer has no eos token (expected <|endoftext|>)")
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [np.asarray([*ids, eos], dtype=np.int32) for ids in enc]


class PackedSequences:
    """Deterministic, seekable packed sequences over a fixed set of tokenised documents."""

    def __init__(self, docs: list[np.ndarray], seq_len: int, seed: int):
        if not docs:
            raise UserError("no pretraining documents (the train split is empty)")
        self.docs = docs
        self.seq_len = seq_len
        self.seed = seed
        self.n_tokens = int(sum(len(d) for d in docs))
        self.n_windows = self.n_tokens // seq_len
        if self.n_windows < 1:
            raise UserError(f"pretraining data has {self.n_tokens} tokens, fewer than one sequence of "
                            f"pretrain.seq_len={seq_len}")
        self._epoch = -1
        self._stream: np.ndarray | None = None

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer, seq_len: int, seed: int) -> PackedSequences:
        return cls(tokenize_documents(texts, tokenizer), seq_len, seed)

    def _epoch_stream(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))
            self._stream = np.concatenate([self.docs[i] for i in order])
            self._epoch = epoch
        return self._stream

    def sequence(self, index: int) -> np.ndarray:
        epoch, w = divmod(index, self.n_windows)
        stream = self._epoch_stream(epoch)
        return stream[w * self.seq_len:(w + 1) * self.seq_len]

    def sequences(self, start: int, count: int) -> torch.Tensor:
        """``count`` consecutive packed sequences from global sequence index ``start`` -> [count, seq_len]."""
        x_BS = np.stack([self.sequence(start + j) for j in range(count)])
        return torch.from_numpy(x_BS.astype(np.int64))

    def micro_batch(self, step: int, micro: int, micro_batch: int, n_micro: int) -> torch.Tensor:
        """Micro-batch ``micro`` (of ``n_micro``) of the global batch for optimizer step ``step``."""
        global_batch = micro_batch * n_micro
        return self.sequences(step * global_batch + micro * micro_batch, micro_batch)

    def epochs_for(self, steps: int, global_batch: int) -> float:
        return steps * global_batch / self.n_windows
