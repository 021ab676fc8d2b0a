"""The request a tier's upstream receives: the client's body with model and logprobs forced."""

from __future__ import annotations

from typing import Any

ENDPOINT_PATHS = {"chat": "chat/completions", "completions": "completions"}
MIN_TOP_LOGPROBS = 5


def endpoint_path(endpoint: str) -> str:
    try:
        return ENDPOINT_PATHS[endpoint]
    except KeyError:
        raise ValueError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}") from None


def tier_body(endpoint: str, body: dict[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
    """Copy of `body` for one tier: its model name, logprobs always on, `stream` as asked.

    Confidence needs logprobs (and a few alternatives for the `answer` method), so they are
    requested whatever the client asked; the server strips them when the client did not ask.
    """
    out = dict(body)
    out["model"] = model
    if endpoint == "chat":
        asked = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
        out["logprobs"] = True
        out["top_logprobs"] = max(MIN_TOP_LOGPROBS, asked)
    elif endpoint == "completions":
        out["logprobs"] = max(MIN_TOP_LOGPROBS, int(body.get("logprobs") or 0))
    else:
        endpoint_path(endpoint)  # raises
    out["stream"] = stream
    if not stream:
        out.pop("stream_options", None)  # vLLM rejects stream_options without stream
    return out
