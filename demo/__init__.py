"""calibserve demo: a synthetic factual world and tiny base / aligned / expert models trained on it.

`build_world()` returns a directory with `base/`, `aligned/`, `expert/` (Hugging Face checkpoints),
`data/` (JSONL evaluation sets) and `world.json` (the facts and each model's measured accuracy
and ECE), cached under `$CALIBSERVE_HOME/demo/<settings hash>/`.
"""

from typing import Any

from calibserve.demo.chat import CHAT_TEMPLATE, LETTERS, format_mc_prompt
from calibserve.demo.settings import CODE_VERSION, DemoSettings, tiny_settings

_BUILD_NAMES = {"MODELS", "CalibrationGapError", "DemoBuildError", "build_world", "default_dir"}


def __getattr__(name: str) -> Any:
    """The build (torch, transformers) loads on first use, so `import demo` stays cheap."""
    if name in _BUILD_NAMES:
        from calibserve.demo import build

        return getattr(build, name)
    raise AttributeError(f"module 'demo' has no attribute {name!r}")

__all__ = [
    "CHAT_TEMPLATE",
    "CODE_VERSION",
    "LETTERS",
    "MODELS",
    "CalibrationGapError",
    "DemoBuildError",
    "DemoSettings",
    "build_world",
    "default_dir",
    "format_mc_prompt",
    "tiny_settings",
]
