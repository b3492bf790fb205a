"""Procedural general English text for language modelling (no downloads).

Paragraphs of 2-5 sentences drawn from a small grammar (subjects, verbs, objects, places, times,
connectives), including occasional self-checking phrases ("Wait, let me check that again.") as
they appear in ordinary writing, so the base model has seen reflection words before RL (the
"aha" detector looks for them in GRPO completions). Rows have ``prompt`` = the text, ``answer`` =
"", ``solution`` = "".

    python -c "import random; from r1zero.data.gen_general import generate; print(generate(random.Random(0), 1))"
"""

from __future__ import annotations

import random

_SUBJ = ["The teacher", "A farmer", "My neighbour", "The old sailor", "A young student", "The baker", "Our team",
         "The doctor", "A small child", "The engineer", "Her brother", "The captain", "A quiet girl", "The writer",
         "His uncle", "The gardener", "A tired runner", "The painter", "The mayor", "A clever fox", "The pilot",
         "The nurse", "A busy clerk", "The singer"]
_VERB = ["found", "carried", "painted", "fixed", "opened", "cleaned", "moved", "sold", "bought", "watched",
         "counted", "built", "lost", "shared", "checked", "measured", "wrote", "read", "planted", "washed"]
_OBJ = ["a red box", "the wooden door", "three letters", "an old map", "the broken clock", "a basket of bread",
        "the long fence", "two maps", "a heavy stone", "the small boat", "a bag of rice", "the garden gate",
        "a new book", "the last ticket", "a bright lamp", "the kitchen table", "a cup of tea", "the blue car",
        "a pile of leaves", "the school bell"]
_PLACE = ["near the river", "in the market", "behind the house", "at the station", "on the hill", "in the library",
          "by the lake", "in the village", "at the harbour", "under the bridge", "in the park", "at school"]
_TIME = ["in the morning", "after lunch", "before dinner", "late at night", "on Monday", "every Sunday",
         "last winter", "at noon", "in the spring", "yesterday"]
_ADJ = ["calm", "cold", "bright", "quiet", "busy", "warm", "windy", "grey", "long", "happy", "strange", "simple"]
_NOUN = ["day", "road", "week", "evening", "story", "lesson", "journey", "plan", "meeting", "summer"]
_CONN = ["Then", "Later", "After that", "Soon", "Meanwhile", "Still", "So", "However"]
_REFLECT = ["Wait, let me check that again.", "At first it looked wrong, so they checked it twice.",
            "However, the count was a mistake, and they tried again.", "They stopped to verify the result.",
            "On second thought, the plan needed another look."]


def _sentence(rng: random.Random) -> str:
    form = rng.randrange(5)
    if form == 0:
        return f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)} {rng.choice(_PLACE)}."
    if form == 1:
        return f"{rng.choice(_TIME).capitalize()}, {rng.choice(_SUBJ).lower()} {rng.choice(_VERB)} {rng.choice(_OBJ)}."
    if form == 2:
        return f"It was a {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_PLACE)}."
    if form == 3:
        return f"{rng.choice(_CONN)}, {rng.choice(_SUBJ).lower()} {rng.choice(_VERB)} {rng.choice(_OBJ)} {rng.choice(_TIME)}."
    n = rng.randint(2, 40)
    return f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {n} things {rng.choice(_PLACE)}."


def prose(rng: random.Random, difficulty: int) -> dict:
    """A paragraph; longer paragraphs at higher difficulty (2-3 sentences at 1, up to 7 at 5)."""
    n = rng.randint(2, 2 + difficulty) if difficulty > 1 else rng.randint(2, 3)
    sents = [_sentence(rng) for _ in range(n)]
    if rng.random() < 0.1:  # occasional reflection phrase (see module docstring)
        sents.insert(rng.randint(1, len(sents)), rng.choice(_REFLECT))
    return {"prompt": " ".join(sents), "answer": "", "solution": "", "meta": {"family": "prose"}}


FAMILIES = {"prose": (prose, 1, 1.0)}


def generate(rng: random.Random, difficulty: int, family: str | None = None) -> dict:
    return prose(rng, difficulty)
