"""Short-answer grading: the normalised match, checked against the SQuAD v1.1 scorer's rules."""

from __future__ import annotations

import re
import string

from hypothesis import given
from hypothesis import strategies as st

from calibserve.calibration.answers import exact_match, normalize_answer


def squad_normalize(s: str) -> str:
    # The official SQuAD v1.1 evaluation script's normalize_answer, verbatim in behaviour.
    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def remove_punc(text: str) -> str:
        return "".join(ch for ch in text if ch not in set(string.punctuation))

    return " ".join(remove_articles(remove_punc(s.lower())).split())


@given(st.text(alphabet=string.ascii_letters + string.punctuation + " \t\n", max_size=40))
def test_normalisation_is_squads_on_ascii(text: str) -> None:
    assert normalize_answer(text) == squad_normalize(text)


def test_examples() -> None:
    assert normalize_answer("  The Red  Cave! ") == "red cave"
    assert normalize_answer("an apple.") == "apple"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("ＡＢＣ") == "abc"  # NFKC folds full-width letters


def test_exact_match_uses_aliases_and_rejects_empty() -> None:
    assert exact_match("the Lake", "lake")
    assert exact_match("NYC", "New York City", aliases=["nyc", "big apple"])
    assert not exact_match("red", "blue", aliases=["green"])
    assert not exact_match("", "")  # an empty reply is never right
    assert not exact_match("the", "a")  # nothing left after normalisation


def test_option_letter_is_the_leading_standalone_letter() -> None:
    from calibserve.calibration.answers import option_letter

    for reply, letter in [("B", "B"), (" B.", "B"), ("B) rome", "B"), ("(C)", "C"),
                          ("**D** oslo", "D"), ("A", "A"), ("\nB\n", "B")]:
        assert option_letter(reply) == letter, reply
    for reply in ["The answer is B", "Bravo", "", "b", "-", "Answer: B"]:
        assert option_letter(reply) is None, reply
    assert option_letter("E", ("A", "B", "C", "D")) is None  # not one of the options
