"""One client view: what calibserve changes in a client's request for the engine, and its
inverse on the engine's answer, for every route (chat, completions, responses).

The confidence needs the answer's logprobs, so a tier's request always asks for them, with at
least the alternatives its confidence methods read (`payload.tier_top_logprobs`) and never fewer
than the client asked for: `tier_body` (chat, completions), `responses_body` (`/v1/responses`).
Where vLLM would derive the prompt's logprobs from the forced value (`echo` without
`prompt_logprobs`), the prompt's are asked for explicitly at the client's own value, so the
engine computes no more of them than the client wanted.

The inverse (`ClientView`, `ResponsesView`) cuts the engine's answer back to what the client
asked to see, following vLLM's own construction, so that the result is what the engine answers
to the client's original request (tests/routing/test_client_view.py checks this as a property;
tests/server/test_fidelity.py against a real engine).
"""

from __future__ import annotations

from typing import Any

from calibserve.routing.payload import MIN_TOP_LOGPROBS, endpoint_path

OUTPUT_LOGPROBS = "message.output_text.logprobs"  # the Responses API's `include` item


def client_prompt_logprobs(endpoint: str, body: dict[str, Any]) -> int | None:
    """How many prompt-token alternatives vLLM would return for the client's own body.

    vLLM's rule: `prompt_logprobs` when given, else with `echo` the answer's value (chat:
    `top_logprobs`, default 0; completions: `logprobs`), else none (None).
    """
    if body.get("prompt_logprobs") is not None:
        return int(body["prompt_logprobs"])
    if not body.get("echo"):
        return None
    value = body.get("top_logprobs", 0) if endpoint == "chat" else body.get("logprobs")
    return None if value is None else int(value)


def tier_body(endpoint: str, body: dict[str, Any], model: str, *, stream: bool,
              top_logprobs: int = MIN_TOP_LOGPROBS, token_ids: bool = False) -> dict[str, Any]:
    """Copy of `body` for one tier: its model name, logprobs always on with at least
    `top_logprobs` alternatives (`tier_top_logprobs` of its scorer), `stream` as asked, and
    the prompt's and reply's token ids when `token_ids` (`verify_reads_ids`).

    `ClientView` strips the logprobs and token ids back to what the client asked for.
    """
    out = dict(body)
    out["model"] = model
    if token_ids:
        out["return_token_ids"] = True
    if endpoint == "chat":
        asked = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
        out["logprobs"] = True
        out["top_logprobs"] = max(top_logprobs, asked)
    elif endpoint == "completions":
        out["logprobs"] = max(top_logprobs, int(body.get("logprobs") or 0))
    else:
        endpoint_path(endpoint)  # raises
    if body.get("echo") and body.get("prompt_logprobs") is None:
        wanted = client_prompt_logprobs(endpoint, body)
        # vLLM refuses prompt_logprobs > 0 with stream: there the forced value stays and the
        # server trims the prompt's alternatives back instead.
        if wanted is None or wanted == 0 or not stream:
            out["prompt_logprobs"] = 0 if wanted is None else wanted
    out["stream"] = stream
    if not stream:
        out.pop("stream_options", None)  # vLLM rejects stream_options without stream
    return out


def responses_body(body: dict[str, Any], model: str,
                   top_logprobs: int = MIN_TOP_LOGPROBS) -> dict[str, Any]:
    """Copy of a `/v1/responses` body for the upstream: its model name, output logprobs on with
    `top_logprobs` alternatives (`tier_top_logprobs`), never fewer than the client asked for."""
    out = dict(body)
    out["model"] = model
    include = body.get("include")
    include = list(include) if isinstance(include, list) else []
    asked = int(body.get("top_logprobs") or 0) if OUTPUT_LOGPROBS in include else 0
    if OUTPUT_LOGPROBS not in include:
        include.append(OUTPUT_LOGPROBS)
    out["include"] = include
    out["top_logprobs"] = max(top_logprobs, asked)
    return out


class ClientView:
    """What the client asked to see of the logprobs the router always requests.

    Trimming follows vLLM's own construction, so the result is what vLLM returns for the
    client's body: each position's alternatives are the sampled (or prompt) token first, then
    the best others in rank order. Chat keeps the first `k`; completions keep the token plus
    the others ranked within the best `k`; `prompt_logprobs` entries keep the token plus the
    ones whose `rank` is within `k`.
    """

    __slots__ = ("endpoint", "want", "top", "prompt", "ids")

    def __init__(self, endpoint: str, body: dict[str, Any]) -> None:
        self.endpoint = endpoint
        if endpoint == "chat":
            self.want = bool(body.get("logprobs"))
            self.top = int(body.get("top_logprobs") or 0)
        else:
            self.want = body.get("logprobs") is not None
            self.top = int(body.get("logprobs") or 0)
        self.prompt = client_prompt_logprobs(endpoint, body)
        # The router may ask for the token ids (verify's prompt on ids: routing/verify_tokens.py),
        # never with `echo` (payload.verify_reads_ids), whose stream carries the prompt's ids
        # whatever was asked: there they are vLLM's own answer and stay.
        self.ids = bool(body.get("return_token_ids")) or bool(body.get("echo"))

    def answer(self, body: dict[str, Any]) -> None:
        """A whole (non-streamed) answer in place: every choice, and for chat the response's
        prompt logprobs and prompt token ids."""
        for choice in body.get("choices") or []:
            self.apply(choice)
        self.apply_prompt(body)
        self.apply_ids(body)

    def chunk(self, chunk: dict[str, Any]) -> None:
        """One streamed chunk in place: its choices' deltas, and chat's first chunk's prompt
        token ids."""
        self.apply_ids(chunk)
        for choice in chunk.get("choices") or []:
            self.apply(choice)

    def apply_ids(self, holder: dict[str, Any]) -> None:
        """The token ids of a choice or a chat response: null, as vLLM writes them, unless the
        client asked for them."""
        if self.ids:
            return
        for key in ("token_ids", "prompt_token_ids"):
            if holder.get(key) is not None:
                holder[key] = None

    def apply(self, choice: dict[str, Any]) -> None:
        """Strip or trim one choice's (or one delta's) logprobs and token ids in place."""
        self.apply_ids(choice)
        if "prompt_logprobs" in choice:
            self.apply_prompt(choice)
        logprobs = choice.get("logprobs")
        if not self.want:
            if logprobs is not None:
                choice["logprobs"] = None
            return
        if not isinstance(logprobs, dict):
            return
        k = self.top
        if self.endpoint == "chat":
            for entry in logprobs.get("content") or []:
                top = entry.get("top_logprobs") if isinstance(entry, dict) else None
                if isinstance(top, list) and len(top) > k:
                    entry["top_logprobs"] = top[:k]
            return
        tops = logprobs.get("top_logprobs")
        if not isinstance(tops, list):
            return
        for i, top in enumerate(tops):
            if isinstance(top, dict) and len(top) > k:
                tops[i] = trim_ranked(top, k)

    def apply_prompt(self, holder: dict[str, Any]) -> None:
        """`prompt_logprobs` of a completions choice or a chat response, as the client asked."""
        entries = holder.get("prompt_logprobs")
        if entries is None:
            return
        if self.prompt is None:
            holder["prompt_logprobs"] = None
            return
        k = self.prompt
        if k < 0 or not isinstance(entries, list):
            return
        for i, entry in enumerate(entries):
            if isinstance(entry, dict) and len(entry) > 1:
                items = list(entry.items())
                entries[i] = dict(items[:1] + [
                    (tid, lp) for tid, lp in items[1:]
                    if isinstance(lp, dict) and int(lp.get("rank") or 0) <= k
                ])


def trim_ranked(top: dict[str, float], k: int) -> dict[str, float]:
    """A completions position's alternatives cut from a larger request to `k`.

    vLLM's dict is the position's own token first, then the best others by rank; for `k` it is
    that token plus the others ranked within the best k (so k entries when the token is itself
    among the best k, else k + 1). The token's rank is one more than the others above it.
    """
    items = list(top.items())
    if not items:
        return top
    own = items[0][1]
    rank = 1 + sum(1 for _, lp in items[1:] if lp > own)
    others = k - 1 if rank <= k else k
    return dict(items[: 1 + max(0, others)])


class ResponsesView:
    """What the client asked to see of the output logprobs calibserve always requests."""

    __slots__ = ("want", "top", "echoed")

    def __init__(self, body: dict[str, Any]) -> None:
        include = body.get("include")
        self.want = isinstance(include, list) and OUTPUT_LOGPROBS in include
        self.top = int(body.get("top_logprobs") or 0)
        # The response echoes the logprobs its sampling used: the client's, or none.
        self.echoed: int | None = body.get("top_logprobs", 0) if self.want else None

    def entries(self, entries: Any, empty: list[Any] | None) -> Any:
        """A logprobs list as the client asked: `empty` (None or []) when it did not."""
        if not isinstance(entries, list):
            return entries
        if not self.want:
            return empty
        for entry in entries:
            top = entry.get("top_logprobs") if isinstance(entry, dict) else None
            if isinstance(top, list) and len(top) > self.top:
                entry["top_logprobs"] = top[: self.top]  # vLLM keeps the first k too
        return entries

    def response(self, obj: dict[str, Any]) -> None:
        """A response object: every output_text part's logprobs, and the echoed top_logprobs."""
        if "top_logprobs" in obj:
            obj["top_logprobs"] = self.echoed
        for item in obj.get("output") or []:
            self.item(item)

    def item(self, item: Any) -> None:
        if isinstance(item, dict):
            for part in item.get("content") or []:
                self.part(part)

    def part(self, part: Any) -> None:
        if isinstance(part, dict) and part.get("type") == "output_text" and "logprobs" in part:
            # A finished part says null when logprobs were not asked for; an empty one [].
            empty: list[Any] | None = [] if part.get("logprobs") == [] else None
            part["logprobs"] = self.entries(part["logprobs"], empty)

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if "response" in event and isinstance(event["response"], dict):
            self.response(event["response"])
        if isinstance(event.get("item"), dict):
            self.item(event["item"])
        if isinstance(event.get("part"), dict):
            self.part(event["part"])
        if kind in ("response.output_text.delta", "response.output_text.done") and \
                "logprobs" in event:
            event["logprobs"] = self.entries(event["logprobs"], [])
