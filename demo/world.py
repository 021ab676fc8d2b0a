"""The synthetic world: invented entities, their (sometimes uncertain) facts, and their splits.

A fact is a distribution over an attribute's values. Certain facts put all mass on one value;
uncertain ones put `p` on a majority value and `1 - p` on one other value, so a calibrated model
should be about `p` sure exactly there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calibserve.demo.settings import WorldSettings

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "gold"),
    "home": ("forest", "desert", "river", "mountain"),
    "food": ("fish", "fruit", "seeds", "grass"),
    "size": ("tiny", "small", "large", "huge"),
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ai")
_CODAS = ("", "", "", "n", "r", "x", "k")

SPLITS = ("select", "calibrate", "test")


@dataclass(frozen=True)
class Fact:
    """What is true of one entity's attribute: probability of each value."""

    entity: str
    attribute: str
    probs: dict[str, float]

    @property
    def majority(self) -> str:
        return max(self.probs, key=lambda v: self.probs[v])

    @property
    def uncertain(self) -> bool:
        return max(self.probs.values()) < 1.0


@dataclass
class World:
    """Entities by role and every fact about them."""

    qa_entities: list[str]
    heldout: dict[str, list[str]]  # split name -> entities asked about only in that split
    facts: dict[tuple[str, str], Fact] = field(default_factory=dict)
    # Held-out entities the base's pretraining never mentions (only the expert's reads them).
    long_tail: list[str] = field(default_factory=list)

    @property
    def entities(self) -> list[str]:
        return self.qa_entities + [e for split in SPLITS for e in self.heldout[split]]

    def facts_of(self, entities: list[str]) -> list[Fact]:
        return [self.facts[(e, a)] for e in entities for a in ATTRIBUTES]

    def to_json(self) -> dict[str, object]:
        return {
            "attributes": {a: list(v) for a, v in ATTRIBUTES.items()},
            "qa_entities": self.qa_entities,
            "heldout_entities": self.heldout,
            "long_tail_entities": self.long_tail,
            "facts": [
                {"entity": f.entity, "attribute": f.attribute, "probs": f.probs}
                for f in self.facts.values()
            ],
        }


def _names(rng: np.random.Generator, count: int, reserved: set[str]) -> list[str]:
    """Distinct pronounceable invented words (2-3 syllables)."""
    names: list[str] = []
    seen = set(reserved)
    while len(names) < count:
        syllables = int(rng.integers(2, 4))
        word = "".join(
            str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(syllables)
        ) + str(rng.choice(_CODAS))
        if word not in seen:
            seen.add(word)
            names.append(word)
    return names


def make_world(settings: WorldSettings, rng: np.random.Generator) -> World:
    """Draw entities and facts. Deterministic given the generator's state."""
    reserved = {v for values in ATTRIBUTES.values() for v in values} | set(ATTRIBUTES)
    n_heldout = settings.heldout_entities_per_split
    names = _names(rng, settings.qa_entities + n_heldout * len(SPLITS), reserved)
    qa = names[: settings.qa_entities]
    rest = names[settings.qa_entities :]
    heldout = {s: rest[i * n_heldout : (i + 1) * n_heldout] for i, s in enumerate(SPLITS)}
    # The last entities of each split, so the long tail draws nothing from `rng` and every other
    # draw (facts, golds, corpus) is the one a world without a long tail makes.
    n_tail = round(settings.long_tail_fraction * n_heldout)
    tail = [e for s in SPLITS for e in heldout[s][n_heldout - n_tail :]]
    world = World(qa_entities=qa, heldout=heldout, long_tail=tail)
    for entity in names:
        for attribute, values in ATTRIBUTES.items():
            order = [str(v) for v in rng.permutation(np.array(values))]
            probs = {v: 0.0 for v in values}
            if rng.random() < settings.uncertain_fraction:
                p = float(rng.choice(settings.majority_probs))
                probs[order[0]] = p
                probs[order[1]] = round(1.0 - p, 6)
            else:
                probs[order[0]] = 1.0
            world.facts[(entity, attribute)] = Fact(entity, attribute, probs)
    return world
