"""The request a tier's upstream receives: the client's body with model and logprobs forced.

The confidence needs the answer's logprobs, so they are always requested, with only as many
alternatives per token as the tier's confidence methods read (`tier_top_logprobs`): the
`answer` method reads the first token's alternatives (5), the token statistics (`mean`, `min`,
`first`, `quantile`) the sampled tokens' own logprobs (0 alternatives), and `verify`'s main
request nothing beyond its fallback's (`mean`: 0). The `answer` method scores only replies to a
prompt that offers lettered options (`options_offered`), so a prompt without them is asked for
the free-form method's alternatives only. Never fewer than the client asked for.
Alternatives cost the engine: each is a token to detokenize and serialise on every position.
The request rewrite itself, and its inverse on the answer, are routing/client_view.py.
"""

from __future__ import annotations

from typing import Any

from calibserve.calibration.confidence import DEFAULT_OPTIONS
from calibserve.calibration.mc_prompt import offers_options, prompt_text
from calibserve.calibration.methods import INTERIM, REGISTRY

ENDPOINT_PATHS = {"chat": "chat/completions", "completions": "completions"}
MIN_TOP_LOGPROBS = 5


def endpoint_path(endpoint: str) -> str:
    try:
        return ENDPOINT_PATHS[endpoint]
    except KeyError:
        raise ValueError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}") from None


def options_offered(endpoint: str, body: dict[str, Any], scorer: object) -> bool | None:
    """Does the request's prompt offer the scorer's option letters (`mc_prompt.offers_options`
    on `mc_prompt.prompt_text`)? None when the prompt cannot be read as text (token ids): then
    the reply alone decides (calibration/scorer.py)."""
    text = prompt_text(endpoint, body)
    if text is None:
        return None
    options = getattr(scorer, "options", DEFAULT_OPTIONS)
    return offers_options(text, tuple(options))


def tier_top_logprobs(scorer: object, options_offered: bool | None = None) -> int:
    """Alternatives per token that a tier's scorer reads from the main request.

    The scorer's multiple-choice method (`method`; not when the prompt offers no options and
    the method reads letters), its free-form method (`free_form_method`) and the interim
    method of methods needing extra work (`INTERIM`) each read the reply's logprobs; the most
    any of them needs. A scorer that does not name its methods gets `MIN_TOP_LOGPROBS`.
    """
    method, free_form = getattr(scorer, "method", None), getattr(scorer, "free_form_method", None)
    if not all(isinstance(name, str) and name in REGISTRY for name in (method, free_form)):
        return MIN_TOP_LOGPROBS
    names = [str(free_form), INTERIM]
    if options_offered is not False or not REGISTRY[str(method)].option_letters:
        names.append(str(method))
    return max(REGISTRY[name].top_logprobs for name in names)


def serves_verify(scorer: object) -> bool:
    """Is the scorer's free-form method `verify` (a second request on the reply's prompt)?"""
    free_form = getattr(scorer, "free_form_method", None)
    method = REGISTRY.get(free_form) if isinstance(free_form, str) else None
    return method is not None and method.extra == "verify"


def verify_reads_ids(scorer: object, endpoint: str, body: dict[str, Any],
                     options_offered: bool | None) -> bool:
    """Should the main request return its token ids, for a verify prompt on ids
    (verify_tokens.py)? When the tier's free-form method is `verify`, the prompt offers no
    lettered options (so the reply may be scored by it) and verify can rephrase the request."""
    if not serves_verify(scorer) or options_offered is True:
        return False
    if body.get("echo"):  # vLLM skips detokenising an echoed prompt when ids are returned
        return False
    if endpoint == "chat":
        return isinstance(body.get("messages"), list)
    return isinstance(body.get("prompt"), str)


def responses_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat request that asks what a `/v1/responses` body asks, for the confidence work of
    confidence_work.py (verify's conversation, consistency's samples) on the same engine.

    `instructions` become the system turn and `input` (a string, or message items whose content
    is a string or text parts) the conversation; sampling keys carry over (`max_output_tokens`
    as `max_tokens`). Input it cannot rephrase (tool calls, images, ...) leaves `messages` out,
    which the confidence work counts as `unsupported`.
    """
    out: dict[str, Any] = {k: body[k] for k in ("model", "temperature", "top_p", "seed")
                           if body.get(k) is not None}
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    messages = _responses_messages(body.get("input"))
    if messages is not None:
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            messages.insert(0, {"role": "system", "content": instructions})
        out["messages"] = messages
    return out


def _responses_messages(value: Any) -> list[dict[str, Any]] | None:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        return None
    messages: list[dict[str, Any]] = []
    for item in value:
        if not isinstance(item, dict) or item.get("type", "message") != "message" or \
                not isinstance(item.get("role"), str):
            return None
        content = item.get("content")
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            if not texts or not all(isinstance(t, str) for t in texts):
                return None
            content = "".join(texts)  # type: ignore[arg-type]
        if not isinstance(content, str):
            return None
        messages.append({"role": item["role"], "content": content})
    return messages
