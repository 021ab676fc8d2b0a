"""Short-answer grading for qa_wikidata under a chat model (`calibserve calibrate --grader`).

qa_wikidata items are sentence stems ("The language of Ivanhoe is") whose gold answer is the
continuation ("English"). An instruction-tuned model answers in its own words ("English.", "The
language of Ivanhoe is English."), so exact match would grade almost every reply wrong. The
grader used here: the normalised gold (or an alias) occurs as a whole-word run in the
normalised first line of the reply: calibserve's built-in `contains` grader
(`calibserve.calibration.grading.contains_answer`), re-exported here for the scripts that
name it `benchmarks.realworld.grading:contains_answer`.
"""

from __future__ import annotations

from calibserve.calibration.grading import contains_answer

__all__ = ["contains_answer", "short_answer_prompt"]


def short_answer_prompt(stem: str) -> str:
    """The user message for a qa_wikidata stem (the wording of calibration and test alike)."""
    return f"Complete the sentence with a short answer (a few words): {stem} ..."


