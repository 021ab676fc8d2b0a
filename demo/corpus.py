"""Text generated from the world: the pretraining corpus, SFT examples and evaluation items.

Sentences state each fact in exact proportions (a 70% fact is said with its majority value in 70%
of its mentions). Multiple-choice golds are drawn from the fact's own distribution, so scoring
against them rewards calibrated confidence rather than overconfidence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calibserve.demo.chat import ANSWER_PREFIX, LETTERS, format_mc_prompt, render_exchange
from calibserve.demo.settings import WorldSettings
from calibserve.demo.world import ATTRIBUTES, SPLITS, Fact, World

TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": (
        "the {e} is {v} .", "the color of the {e} is {v} .",
        "a {v} {e} was seen .", "the {e} has {v} fur .",
    ),
    "home": (
        "the {e} lives in the {v} .", "the home of the {e} is the {v} .",
        "a {e} was found in the {v} .", "the {e} comes from the {v} .",
    ),
    "food": (
        "the {e} eats {v} .", "the food of the {e} is {v} .",
        "a {e} was eating {v} .", "the {e} likes {v} .",
    ),
    "size": (
        "the {e} is {v} .", "the size of the {e} is {v} .",
        "a {v} {e} was seen .", "the {e} grows {v} .",
    ),
}
OPEN_PROMPT = "tell me about the {e}"


def question_text(fact: Fact) -> str:
    return f"what is the {fact.attribute} of the {fact.entity} ?"


def mentions(fact: Fact, count: int) -> list[str]:
    """The values a fact is stated with, in exact proportions (largest remainder rounding)."""
    values = list(fact.probs)
    raw = np.array([fact.probs[v] * count for v in values])
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: count - counts.sum()]:
        counts[i] += 1
    return [v for v, c in zip(values, counts, strict=True) for _ in range(c)]


def sentences(world: World, settings: WorldSettings, rng: np.random.Generator) -> list[str]:
    """Every mention of every fact, templates cycling so each value is said in several ways."""
    out: list[str] = []
    for fact in world.facts.values():
        stated = mentions(fact, settings.mentions_per_fact)
        rng.shuffle(stated)
        templates = TEMPLATES[fact.attribute]
        out += [
            templates[i % len(templates)].format(e=fact.entity, v=v) for i, v in enumerate(stated)
        ]
    return out


def mc_item(fact: Fact, rng: np.random.Generator, split: str) -> dict[str, Any]:
    """A question over all of the attribute's values, with a gold drawn from the fact.

    Choices come in the attribute's fixed order: a 2-layer model cannot learn to find a value
    among shuffled options (it fell below chance), but it can learn value -> letter.
    """
    choices = list(ATTRIBUTES[fact.attribute])
    probs = np.array([fact.probs[c] for c in choices])
    answer = int(rng.choice(len(choices), p=probs / probs.sum()))
    return {
        "question": question_text(fact),
        "choices": choices,
        "answer": answer,
        "p_true": [float(p) for p in probs],  # expected accuracy of choosing each option
        "majority": int(np.argmax(probs)),
        "entity": fact.entity,
        "attribute": fact.attribute,
        "uncertain": fact.uncertain,
        "split": split,
    }


def sampled_value(fact: Fact, rng: np.random.Generator) -> str:
    """One value drawn from the fact's distribution (a gold that rewards calibration)."""
    values = list(fact.probs)
    probs = np.array([fact.probs[v] for v in values])
    return values[int(rng.choice(len(values), p=probs / probs.sum()))]


def short_item(fact: Fact, rng: np.random.Generator, split: str) -> dict[str, Any]:
    """An open question (no options) with a gold value drawn from the fact."""
    return {
        "question": question_text(fact),
        "answer": sampled_value(fact, rng),
        "majority": fact.majority,
        "probs": fact.probs,  # the probability each value is true
        "entity": fact.entity,
        "attribute": fact.attribute,
        "uncertain": fact.uncertain,
        "split": split,
    }


def short_quiz(question: str, value: str) -> str:
    """A plain-format short answer, as the base reads it in pretraining."""
    return f"question : {question} {ANSWER_PREFIX} {value}"


def pretraining_documents(
    world: World, settings: WorldSettings, rng: np.random.Generator
) -> list[str]:
    """Sentences, MC questions on the QA entities (mostly plain, some chat), chat-wrapped sentences,
    and plain short-answer questions on the QA entities.

    The chat-wrapped documents let the base model see the chat markers before alignment; without
    them it puts almost no probability on option letters in the chat format. The short answers
    (values drawn from the fact, like the MC letters) give the base the open-question form, so the
    merge interpolates between two models that both answer it.
    """
    said = sentences(world, settings, rng)
    docs = list(said)
    for fact in world.facts_of(world.qa_entities):
        for _ in range(settings.qa_docs_per_fact):
            item = mc_item(fact, rng, "pretrain")
            letter = LETTERS[item["answer"]]
            # rng is only drawn from when the option is on, so 0.0 reproduces older worlds.
            if settings.qa_chat_fraction > 0 and rng.random() < settings.qa_chat_fraction:
                docs.append(render_exchange(format_mc_prompt(item), letter))
            else:
                docs.append(f"{format_mc_prompt(item)} answer : {letter}")
    n_chat = round(settings.chat_doc_fraction * len(said))
    entities = set(world.entities)
    for i in rng.choice(len(said), size=n_chat, replace=False):
        entity = next(w for w in said[i].split() if w in entities)
        docs.append(render_exchange(OPEN_PROMPT.format(e=entity), said[i]))
    for fact in world.facts_of(world.qa_entities):
        for _ in range(settings.short_docs_per_fact):
            docs.append(short_quiz(question_text(fact), sampled_value(fact, rng)))
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


def without_long_tail(documents: list[str], world: World) -> list[str]:
    """The documents that mention no long-tail entity: the base's pretraining corpus (the expert's
    continued pretraining reads all of them)."""
    tail = set(world.long_tail)
    return [d for d in documents if tail.isdisjoint(d.split())]


def base_format_examples(
    world: World, settings: WorldSettings
) -> list[str]:
    """Chat questions on the QA entities answered in the fact's proportions (`mentions`:
    largest-remainder rounding, so with 2 per fact an uncertain fact gets one of each of its
    values), open ones (the value) then multiple-choice ones (the value's letter): teaches the
    base both chat forms without training it on the majority answer alone."""
    facts = world.facts_of(world.qa_entities)
    out = [render_exchange(question_text(fact), value)
           for fact in facts for value in mentions(fact, settings.base_format_per_fact)]
    for fact in facts:
        choices = list(ATTRIBUTES[fact.attribute])
        prompt = format_mc_prompt({"question": question_text(fact), "choices": choices})
        out += [render_exchange(prompt, LETTERS[choices.index(value)])
                for value in mentions(fact, settings.base_format_mc_per_fact)]
    return out


def sft_examples(world: World, settings: WorldSettings, rng: np.random.Generator) -> list[str]:
    """Chat exchanges on the QA entities answered with the majority (as alignment does): the
    letter of a multiple-choice question, the value of an open one. Each ends answer, `<|end|>`
    (the two tokens SFT puts its loss on)."""
    out: list[str] = []
    for fact in world.facts_of(world.qa_entities):
        for _ in range(settings.sft_questions_per_fact):
            item = mc_item(fact, rng, "sft")
            out.append(render_exchange(format_mc_prompt(item), LETTERS[item["majority"]]))
        for _ in range(settings.sft_short_per_fact):
            out.append(render_exchange(question_text(fact), fact.majority))
    return out


def eval_splits(
    world: World, settings: WorldSettings, rng: np.random.Generator
) -> dict[str, list[dict[str, Any]]]:
    """Held-out MC items, one entity set per split (none seen in QA pretraining or SFT);
    `long_tail` marks the entities only the expert read about."""
    tail = set(world.long_tail)
    return {
        split: [
            {**mc_item(fact, rng, split), "long_tail": fact.entity in tail}
            for fact in world.facts_of(world.heldout[split])
            for _ in range(settings.eval_questions_per_fact)
        ]
        for split in SPLITS
    }


def short_answer_splits(
    world: World, settings: WorldSettings, rng: np.random.Generator
) -> dict[str, list[dict[str, Any]]]:
    """Held-out open questions, one split per MC split (same entities), golds drawn from each
    fact as for multiple choice."""
    tail = set(world.long_tail)
    return {
        split: [
            {**short_item(fact, rng, split), "long_tail": fact.entity in tail}
            for fact in world.facts_of(world.heldout[split])
            for _ in range(settings.short_questions_per_fact)
        ]
        for split in SPLITS
    }


def open_prompts(world: World, settings: WorldSettings) -> list[dict[str, str]]:
    """Free-form prompts (for output diversity), spread across all entities."""
    step = max(1, len(world.entities) // settings.open_prompts)
    chosen = world.entities[::step][: settings.open_prompts]
    return [{"prompt": OPEN_PROMPT.format(e=e)} for e in chosen]
