"""How a multiple-choice item is asked: the one user message merge's evaluator, `calibserve
calibrate` and the server's probes send for `{"question", "choices", "answer"}`.

The default wording is the contract of docs/internals.md, `question : {question} A {c0} B {c1} ...`
(one space between words; the demo world's models are trained on it, and demo/chat.py keeps a copy
that tests/test_contracts.py holds equal, since the demo imports nothing of ours). An item may
carry its own wording in `"prompt"` (a string, sent verbatim as the user message; `choices` and
`answer` still say which letter is right): real instruction-tuned models answer the bare contract
wording with words as often as with a letter, so calibration data for them is usually worded the
way their traffic is, e.g. ending in "Answer with the letter of the correct option."
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["LETTERS", "format_mc_prompt"]

LETTERS: tuple[str, ...] = ("A", "B", "C", "D", "E", "F", "G", "H")


def format_mc_prompt(item: Mapping[str, Any]) -> str:
    """The user message for a multiple-choice item: its `prompt` if it has one, else the
    contract wording built from `question` and `choices`."""
    prompt = item.get("prompt")
    if isinstance(prompt, str):
        return prompt
    choices: Sequence[str] = item["choices"]
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    parts = [f"question : {item['question']}"]
    parts += [f"{LETTERS[i]} {choice}" for i, choice in enumerate(choices)]
    return " ".join(parts)
