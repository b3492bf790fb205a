"""Byte-level BPE tokenizer trained with HF ``tokenizers`` on the data mix.

Byte-level (GPT-2 style, Radford et al. 2019) so any text round-trips; special tokens
``<|endoftext|>`` (eos), ``<|pad|>`` and the four R1 tags ``<think> </think> <answer> </answer>``
are single tokens that BPE never splits. Saved as a plain ``tokenizer.json``;
:func:`load_tokenizer` wraps it in a ``transformers.PreTrainedTokenizerFast`` with eos/pad set,
and works on a data dir, a model dir written by ``tok.save_pretrained``, or a tokenizer.json path.

    from r1zero.data.tokenizer import load_tokenizer
    tok = load_tokenizer("runs/tiny/data")
    tok("Assistant: <think>")["input_ids"]
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from r1zero import store
from r1zero.errors import UserError
from r1zero.template import EOS_TOKEN, PAD_TOKEN, TAG_TOKENS

SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, *TAG_TOKENS]


def check_vocab_size(vocab_size: int) -> None:
    min_vocab = 256 + len(SPECIAL_TOKENS)  # every byte + the special tokens
    if vocab_size < min_vocab:
        raise UserError(f"data.vocab_size {vocab_size} too small: byte-level BPE needs >= {min_vocab}")


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path | None = None):
    """Train a byte-level BPE on ``texts``; save to ``path`` (tokenizer.json) when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    # Digits split one per token: a tiny model learns column arithmetic far more easily than
    # with BPE merging arbitrary digit runs (as Llama and DeepSeek tokenizers do).
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path), pretty=False)
    return tok


def wrap(tokenizer_object):
    """A ``PreTrainedTokenizerFast`` around a ``tokenizers.Tokenizer`` with our special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   bos_token=None, unk_token=None, additional_special_tokens=list(TAG_TOKENS))


def load_tokenizer(path: str | Path):
    """Load the tokenizer of a data dir, a model dir (``save_pretrained``) or a tokenizer.json (or URI)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    p = Path(store.materialize(str(path)))
    if p.is_dir() and (p / "tokenizer_config.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(str(p))
        if tok.eos_token is None:
            tok.eos_token = EOS_TOKEN
        if tok.pad_token is None:
            tok.pad_token = PAD_TOKEN
        return tok
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"no tokenizer.json in {path}")
    try:
        raw = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"{file.name} in {path} is not a valid tokenizer: {str(err).splitlines()[0]}") from None
    return wrap(raw)
