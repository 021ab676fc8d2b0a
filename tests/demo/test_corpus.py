"""The base's format SFT set: both chat forms, answers in each fact's exact proportions."""

from __future__ import annotations

from collections import Counter

import numpy as np

from calibserve.demo.chat import END, LETTERS, format_mc_prompt, render_exchange
from calibserve.demo.corpus import base_format_examples, mentions, question_text
from calibserve.demo.settings import WorldSettings
from calibserve.demo.world import ATTRIBUTES, make_world


def _reply(exchange: str) -> str:
    """The answer token of a rendered exchange (`... answer : X <|end|>`)."""
    return exchange.removesuffix(f" {END}").rsplit(" ", 1)[1]


def test_format_sft_teaches_both_forms_in_proportion() -> None:
    ws = WorldSettings(qa_entities=6, heldout_entities_per_split=1, uncertain_fraction=1.0,
                       base_format_per_fact=4, base_format_mc_per_fact=20)
    world = make_world(ws, np.random.default_rng(3))
    texts = base_format_examples(world, ws)
    facts = world.facts_of(world.qa_entities)
    assert len(texts) == len(facts) * (4 + 20)
    for fact in facts:
        choices = list(ATTRIBUTES[fact.attribute])
        mc_prompt = render_exchange(
            format_mc_prompt({"question": question_text(fact), "choices": choices}), "")
        mc_prefix = mc_prompt.removesuffix(f"  {END}")
        letters = Counter(_reply(t) for t in texts if t.startswith(mc_prefix + " "))
        # Each letter as often as its value is stated: an uncertain fact's minority letter too.
        assert letters == Counter(LETTERS[choices.index(v)] for v in mentions(fact, 20))
        assert len(letters) == 2  # every fact here is uncertain: two values, two letters
        open_prefix = render_exchange(question_text(fact), "").removesuffix(f"  {END}")
        values = Counter(_reply(t) for t in texts if t.startswith(open_prefix + " "))
        assert values == Counter(mentions(fact, 4))


def test_no_multiple_choice_exchanges_when_off() -> None:
    ws = WorldSettings(qa_entities=4, heldout_entities_per_split=1, base_format_mc_per_fact=0)
    world = make_world(ws, np.random.default_rng(0))
    texts = base_format_examples(world, ws)
    assert len(texts) == 4 * len(ATTRIBUTES) * ws.base_format_per_fact
    assert not any("question :" in t for t in texts)
