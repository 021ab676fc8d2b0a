"""ClientView: trimming the engine's answer to the logprobs the router asked for gives what the
engine answers to the client's own request (vLLM's construction, modelled here for one position;
the same against a real engine is the vLLM-marked fidelity test)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from calibserve.routing.client_view import ClientView


def vllm_alternatives(vocab: int, sampled: int, k: int) -> dict[str, float]:
    """vLLM's alternatives at a position for `k`: the sampled token first, then the best k by
    rank (the sampled one not twice). Token r has rank r + 1."""
    out = {f"t{sampled}": -sampled - 0.5}
    for r in range(min(k, vocab)):
        out.setdefault(f"t{r}", -r - 0.5)
    return out


def chat_answer(vocab: int, sampled: list[int], k: int) -> dict[str, Any]:
    content = [{"token": f"t{s}", "logprob": -s - 0.5, "top_logprobs": [
        {"token": t, "logprob": lp} for t, lp in list(vllm_alternatives(vocab, s, k).items())[:k]]}
        for s in sampled]
    return {"index": 0, "logprobs": {"content": content}}


def completions_answer(vocab: int, sampled: list[int], k: int) -> dict[str, Any]:
    return {"index": 0, "logprobs": {
        "tokens": [f"t{s}" for s in sampled],
        "token_logprobs": [-s - 0.5 for s in sampled],
        "top_logprobs": [vllm_alternatives(vocab, s, k) for s in sampled]}}


positions = st.integers(2, 12).flatmap(lambda v: st.tuples(
    st.just(v), st.lists(st.integers(0, v - 1), min_size=1, max_size=4),
    st.integers(0, v)).flatmap(lambda t: st.tuples(st.just(t), st.integers(0, t[2]))))


@given(positions)
def test_chat_trimmed_is_the_engines_answer_to_the_clients_request(case: Any) -> None:
    (vocab, sampled, asked), client_k = case
    choice = chat_answer(vocab, sampled, asked)  # what the router asked for
    ClientView("chat", {"logprobs": True, "top_logprobs": client_k}).apply(choice)
    assert choice == chat_answer(vocab, sampled, client_k)


@given(positions)
def test_completions_trimmed_is_the_engines_answer_to_the_clients_request(case: Any) -> None:
    (vocab, sampled, asked), client_k = case
    choice = completions_answer(vocab, sampled, asked)
    ClientView("completions", {"logprobs": client_k}).apply(choice)
    assert choice == completions_answer(vocab, sampled, client_k)


def test_logprobs_not_asked_for_are_removed_and_token_ids_nulled() -> None:
    choice = {**chat_answer(6, [3], 5), "token_ids": [1, 2]}
    ClientView("chat", {}).apply(choice)
    assert choice["logprobs"] is None and choice["token_ids"] is None
    choice = {**completions_answer(6, [3], 5), "token_ids": [1, 2]}
    ClientView("completions", {"return_token_ids": True}).apply(choice)
    assert choice["logprobs"] is None and choice["token_ids"] == [1, 2]
