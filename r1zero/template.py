"""The R1-Zero prompt template: render prompts/completions, extract answers, check format.

DeepSeek-R1 (arXiv 2501.12948, Table 1) trains R1-Zero with one fixed template: a conversation in
which the assistant first reasons inside ``<think> </think>`` and then answers inside
``<answer> </answer>``. :data:`R1_ZERO_PAPER_TEMPLATE` is the paper's wording; the default
:data:`R1_ZERO_TEMPLATE` keeps its structure but is shortened so that a prompt fits the tiny
preset's 128-256 token context (the paper's preamble alone is ~60 words).

    >>> p = render_prompt("What is 2 + 3?")
    >>> p.endswith("Assistant: <think>")
    True
    >>> extract_answer(p + render_completion("2 + 3 = 5.", "5"))
    '5'

Everything here is a pure function on strings; the GRPO reward, the eval and the pretraining
documents (:mod:`r1zero.data.documents`) all share it.
"""

from __future__ import annotations

import re

from r1zero.errors import UserError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAG_TOKENS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# DeepSeek-R1 paper, Table 1 ("Template for DeepSeek-R1-Zero"); {question} replaces "prompt".
R1_ZERO_PAPER_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {question}. Assistant: <think>"
)
# Same structure, short enough for a 128-token context (why: see the module docstring).
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The Assistant thinks in <think> </think> and "
    "answers in <answer> </answer>.\nUser: {question}\nAssistant: <think>"
)

# The instruction put in the user turn when a base's chat template wraps the prompt
# (data.chat_template): the same contract as R1_ZERO_TEMPLATE, the assistant turn opens with <think>.
R1_ZERO_CHAT_INSTRUCTION = (
    "Think about the reasoning process in <think> </think> and then give the answer in "
    "<answer> </answer>.\n{question}"
)

_ANSWER_RE = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
_TRAILING_SPECIAL_RE = re.compile(r"(?:\s|" + re.escape(EOS_TOKEN) + "|" + re.escape(PAD_TOKEN) + r")*\Z")


def render_prompt(question: str, paper: bool = False) -> str:
    """The R1-Zero prompt for ``question``; ends with ``"Assistant: <think>"``.

    ``paper=True`` uses the paper's full wording instead of the short default.
    """
    template = R1_ZERO_PAPER_TEMPLATE if paper else R1_ZERO_TEMPLATE
    return template.format(question=question.strip())


def render_chat_prompt(question: str, tokenizer) -> str:
    """The R1-Zero prompt inside ``tokenizer``'s chat template; ends with the assistant turn + ``<think>``.

    The tags stay plain text unless the tokenizer has them as special tokens; either way the
    completion format (and :func:`format_ok`) is the same as for :func:`render_prompt`.
    """
    messages = [{"role": "user", "content": R1_ZERO_CHAT_INSTRUCTION.format(question=question.strip())}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + THINK_OPEN


def _bos_prefix(tokenizer) -> str:
    """The BOS token's text when ``tokenizer`` adds one by default (Llama-style bases), else "".

    Prompts are tokenized with ``add_special_tokens=False`` everywhere (one code path for every
    tokenizer), so a base trained with BOS at the start of each document gets it as text here.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if tokenizer is None or not bos:
        return ""
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos if ids[:1] == [tokenizer.bos_token_id] else ""


def prompt_renderer(tokenizer=None, chat_template: bool = False):
    """``question -> prompt``: :func:`render_chat_prompt` with ``chat_template``, else :func:`render_prompt`
    (after the BOS token for tokenizers that add one, see :func:`_bos_prefix`).

    GRPO, eval and the held-out check all render through this (``cfg.data.chat_template``).
    """
    bos = _bos_prefix(tokenizer)

    def with_bos(text: str) -> str:
        return text if not bos or text.startswith(bos) else bos + text

    if chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("data.chat_template is true but the model's tokenizer has no chat template")
        return lambda question: with_bos(render_chat_prompt(question, tokenizer))
    if not bos:
        return render_prompt
    return lambda question: with_bos(render_prompt(question))


def render_completion(solution: str, answer: str) -> str:
    """The text after the prompt: ``"{solution} </think> <answer> {answer} </answer>"``."""
    return f"{solution.strip()} {THINK_CLOSE} {ANSWER_OPEN} {str(answer).strip()} {ANSWER_CLOSE}"


def extract_answer(text: str | None) -> str | None:
    """Content of the last complete ``<answer> ... </answer>`` pair (stripped), else None."""
    if not text:
        return None
    found = _ANSWER_RE.findall(text)
    if not found:
        return None
    return found[-1].strip()


def _completion_part(text: str) -> str:
    """The completion: whatever follows the last ``Assistant: <think>`` (or a leading ``<think>``)."""
    marker = "Assistant: " + THINK_OPEN
    i = text.rfind(marker)
    if i >= 0:
        return text[i + len(marker):]
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        return stripped[len(THINK_OPEN):]
    return text


def format_ok(text: str | None, strict: bool = False) -> bool:
    """Whether a completion follows the R1-Zero format.

    ``text`` is the completion (what follows ``"Assistant: <think>"``), or a full prompt +
    completion. Lenient: a ``</think>`` followed later by a non-empty ``<answer> ... </answer>``.
    Strict: exactly ``reasoning </think> <answer> answer </answer>`` with non-empty reasoning and
    answer, each tag exactly once, no stray ``<think>``, and nothing but whitespace / end-of-text
    after ``</answer>``.
    """
    if not text:
        return False
    body = _completion_part(text)
    close = body.find(THINK_CLOSE)
    if close < 0:
        return False
    after = body[close + len(THINK_CLOSE):]
    m = _ANSWER_RE.search(after)
    if m is None or not m.group(1).strip():
        return False
    if not strict:
        return True
    reasoning = body[:close]
    if not reasoning.strip():
        return False
    if any(body.count(t) != 1 for t in (THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)) or THINK_OPEN in body:
        return False
    if after[: m.start()].strip():  # text between </think> and <answer>
        return False
    return _TRAILING_SPECIAL_RE.fullmatch(after[m.end():]) is not None
