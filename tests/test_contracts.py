"""Cross-package contracts from docs/internals.md that no single package's tests can see."""

from __future__ import annotations

import subprocess
import sys

import calibserve.demo as demo
from calibserve.merge.evaluate import format_mc_prompt as merge_prompt

ITEMS = [
    {"question": "what is the color of the zorp ?", "choices": ["red", "blue", "green", "gold"],
     "answer": 2},
    {"question": "what is the home of the kib ?", "choices": ["cave", "lake", "hill", "wood"],
     "answer": 0},
]


def test_demo_and_merge_ask_multiple_choice_questions_the_same_way() -> None:
    for item in ITEMS:
        assert demo.format_mc_prompt(item) == merge_prompt(item)
    assert merge_prompt(ITEMS[0]) == (
        "question : what is the color of the zorp ? A red B blue C green D gold"
    )


def test_the_console_script_loads_without_torch() -> None:
    # `calibserve serve` must start fast and small: only the demo build and merge need torch.
    code = "import sys, calibserve.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
