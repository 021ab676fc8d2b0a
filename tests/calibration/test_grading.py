"""The built-in graders by short name, and `module:function` graders."""

from __future__ import annotations

import pytest

from calibserve.calibration.answers import exact_match
from calibserve.calibration.errors import CalibrationError
from calibserve.calibration.grading import GRADERS, contains_answer, load_grader


def test_short_names_and_default() -> None:
    assert load_grader(None) is exact_match and load_grader("exact") is exact_match
    assert load_grader("contains") is contains_answer
    assert set(GRADERS) == {"exact", "contains"}
    assert load_grader("calibserve.calibration.grading:contains_answer") is contains_answer


def test_contains_is_a_whole_word_run_of_the_first_line() -> None:
    assert contains_answer("The capital of France is Paris.", "Paris")
    assert contains_answer("It is New  York, I think", "new york")
    assert contains_answer("Lutetia, today", "Paris", ["Lutetia"])
    assert not contains_answer("Parisian food", "Paris")  # not a whole word
    assert not contains_answer("I don't know\nParis", "Paris")  # first line only
    assert not contains_answer("", "Paris") and not contains_answer("the", "the")
    # exact needs the whole reply: the same reply is wrong under it
    assert not exact_match("The capital of France is Paris.", "Paris")


@pytest.mark.parametrize("spec", ["fuzzy", "no_such_module_xyz:f", "calibserve.calibration:nope",
                                  "calibserve.calibration.grading:GRADERS"])
def test_unknown_graders_are_refused_with_the_valid_names(spec: str) -> None:
    with pytest.raises(CalibrationError) as err:
        load_grader(spec)
    assert spec in str(err.value)
