"""Tests for r1zero.template: the R1-Zero prompt, completion, answer extraction and format check."""

from __future__ import annotations

import pytest

from r1zero.template import (
    R1_ZERO_PAPER_TEMPLATE,
    extract_answer,
    format_ok,
    render_completion,
    render_prompt,
)


def test_prompt_ends_with_think_and_holds_question():
    p = render_prompt("  What is 2 + 3?  ")
    assert p.endswith("Assistant: <think>")
    assert "User: What is 2 + 3?\n" in p
    assert "<answer> </answer>" in p and "<think> </think>" in p


def test_paper_template_is_the_papers_wording():
    p = render_prompt("Q", paper=True)
    assert p == R1_ZERO_PAPER_TEMPLATE.format(question="Q")
    assert p.startswith("A conversation between User and Assistant. The user asks a question")
    assert p.endswith("User: Q. Assistant: <think>")


def test_completion_format_is_the_contract():
    assert render_completion(" 2 + 3 = 5. ", 5) == "2 + 3 = 5. </think> <answer> 5 </answer>"


def test_full_document_round_trips_answer_and_is_strictly_formatted():
    text = render_prompt("What is 2 + 3?") + render_completion("2 + 3 = 5.", "5")
    assert extract_answer(text) == "5"
    assert format_ok(text, strict=True)
    assert format_ok(render_completion("x", "y"), strict=True)


@pytest.mark.parametrize("text,expected", [
    ("<answer> 7 </answer>", "7"),
    ("<answer>1</answer> then <answer> 2 </answer>", "2"),  # the last complete pair
    ("<answer> 3", None),  # unterminated
    ("no tags at all", None),
    ("", None),
    (None, None),
    ("<answer>\n  x = 4\n</answer>", "x = 4"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion,lenient,strict", [
    ("2 + 3 = 5. </think> <answer> 5 </answer>", True, True),
    ("2 + 3 = 5. </think> <answer> 5 </answer><|endoftext|>", True, True),
    ("2 + 3 = 5. </think> <answer> 5 </answer> and more words", True, False),
    ("2 + 3 = 5. </think> so <answer> 5 </answer>", True, False),
    (" </think> <answer> 5 </answer>", True, False),  # empty reasoning
    ("r </think> <answer>  </answer>", False, False),  # empty answer
    ("r <answer> 5 </answer>", False, False),  # no </think>
    ("r </think> <answer> 5", False, False),  # unterminated answer
    ("<answer> 5 </answer> r </think>", False, False),  # answer before </think>
    ("r </think> <answer> 4 </answer> <answer> 5 </answer>", True, False),  # two answers
    ("r <think> s </think> <answer> 5 </answer>", True, False),  # stray <think>
])
def test_format_ok(completion, lenient, strict):
    assert format_ok(completion, strict=False) is lenient
    assert format_ok(completion, strict=True) is strict
    # the same verdict when given the full prompt + completion
    assert format_ok(render_prompt("q") + completion, strict=True) is strict


def test_prompt_renderer_plain_or_in_the_tokenizers_chat_template():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from r1zero.errors import UserError
    from r1zero.template import format_ok, prompt_renderer

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")
    assert prompt_renderer(tok, False)("What is 2 + 3?") == render_prompt("What is 2 + 3?")
    with pytest.raises(UserError, match="no chat template"):
        prompt_renderer(tok, True)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    p = prompt_renderer(tok, True)("  What is 2 + 3?  ")
    assert p.startswith("[user] ") and "<answer> </answer>" in p and "What is 2 + 3?\n" in p
    assert p.endswith("[assistant] <think>")
    assert format_ok(" 2 + 3 = 5 </think> <answer> 5 </answer>", strict=True)  # same completion contract


def test_prompt_renderer_prefixes_bos_for_tokenizers_that_add_it():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from r1zero.template import prompt_renderer

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "x": 3}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert prompt_renderer(plain)("Q") == render_prompt("Q")  # has a BOS but never adds it
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    p = prompt_renderer(llama_like)("Q")
    assert p == "<s>" + render_prompt("Q")
    assert llama_like(p, add_special_tokens=False)["input_ids"][0] == 1  # one BOS, as the base was trained
    llama_like.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert prompt_renderer(llama_like, True)("Q").count("<s>") == 1
