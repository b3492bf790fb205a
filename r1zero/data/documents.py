"""Render data rows as pretraining documents (the PRETRAIN stage calls :func:`pretrain_text`).

Math/code/cross rows are rendered mostly in plain formats ("Question: ... Answer: 42", a worked
solution, ...), and a fraction ``template_fraction`` (config ``data.template_fraction``, default
0.5) with the R1 template (:func:`r1zero.template.render_prompt` + ``render_completion``). So the
base model has seen the tags and the format, but is not reliably formatted -- GRPO then has room
to improve both format and accuracy (the article's R1-Zero setting: no SFT before RL).
General rows are their plain text.

Of the template documents, a fraction ``reasoning_fraction`` (config ``data.reasoning_fraction``,
default 1.0) carries the worked solution inside ``<think>``; the rest close the think block at
once and answer directly, as much web text states answers without working. A base model trained
on such a mix answers some prompts with reasoning and some without; whether reasoning pays is
left for RL to discover (R1-Zero's growing response length, DeepSeek-R1 paper Fig. 3).

``solution_style`` (config ``data.solution_style``): ``plain`` keeps the generated solutions;
``digits`` writes their arithmetic column by column (:mod:`r1zero.data.digits`), in every format.

    import random
    from r1zero.data.documents import pretrain_text
    pretrain_text(row, random.Random(0), template_fraction=cfg.data.template_fraction)
"""

from __future__ import annotations

import random

from r1zero.data.digits import expand_arithmetic
from r1zero.template import render_completion, render_prompt

_PLAIN_FORMATS = (
    "Question: {prompt}\nAnswer: {answer}",
    "Question: {prompt}\nSolution: {solution}\nAnswer: {answer}",
    "{prompt}\n{solution} The answer is {answer}.",
    "Problem: {prompt}\nWorking: {solution}\nFinal answer: {answer}",
)


def pretrain_text(row: dict, rng: random.Random, template_fraction: float = 0.5,
                  reasoning_fraction: float = 1.0, solution_style: str = "plain") -> str:
    """One pretraining document for ``row`` (no eos appended: the packer adds it)."""
    if row["domain"] == "general" or not str(row.get("answer", "")).strip():
        return row["prompt"]
    if solution_style == "digits" and row.get("solution"):
        row = {**row, "solution": expand_arithmetic(row["solution"])}
    if rng.random() < template_fraction:
        # why the guard: at 1.0 no extra draw, so existing presets render byte-identical documents
        worked = reasoning_fraction >= 1.0 or rng.random() < reasoning_fraction
        return render_prompt(row["prompt"]) + render_completion(row.get("solution", "") if worked else "", row["answer"])
    fmt = rng.choice(_PLAIN_FORMATS) if row.get("solution") else _PLAIN_FORMATS[0]
    return fmt.format(prompt=row["prompt"], answer=row["answer"], solution=row.get("solution", ""))
