"""`verify`'s prompt as token ids: the reply's own prompt and tokens, then the question's.

The verify request asks the engine whether a reply was right. Sent as text, the engine renders
the chat template again and tokenises the whole conversation a second time (about 4 ms of its
API server's CPU per request on the CPU demo, RESULTS.md "verify: where the time goes"). The main
request already produced those tokens, so calibserve asks for them (vLLM's `return_token_ids`:
`prompt_token_ids` and each choice's `token_ids`, stripped again before the client sees the
answer unless it asked) and sends verify as one `/v1/completions` request whose prompt is

    prompt_token_ids + the reply's token_ids + the tail

where the tail is what the text prompt adds after the reply: for completions the suffix
(`VERIFY_SUFFIX`) tokenised alone; for chat the chat template's end of the assistant turn, the
question as a user turn and the next assistant header. `VerifyTails` learns each tail once per
tier from the engine itself, with 1-token requests that return their prompt's ids:

- completions: the suffix, `add_special_tokens: false`;
- chat: the conversation `[user: PROBE_USER]` (a) and `[user: PROBE_USER, assistant:
  PROBE_REPLY, user: question]` (b), both with the generation prompt, and PROBE_REPLY alone (r):
  when b starts with a + r, the tail is the rest of b. A template for which that does not hold
  (one that rewrites earlier turns, say) has no tail: verify stays on the text prompt there.

The reply's ids are used only when they are exactly what its text says: all of them when it
stopped on length; without the last one when it stopped on the end-of-sequence token or a stop
token id (the template's tail then ends the turn itself); not at all (text prompt) when a stop
string cut the text, or the reply carries tool calls or reasoning. So the verify prompt is the
text prompt's tokens, give or take the tokeniser's merges across the reply's end, and the map
`calibserve calibrate` fits through the serving path is fitted on the same requests it serves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from calibserve.calibration import verify_messages
from calibserve.routing.errors import UpstreamError
from calibserve.routing.upstream_client import UpstreamClient

__all__ = ["PROBE_REPLY", "PROBE_USER", "ReplyIds", "VerifyTails", "reply_ids"]

PROBE_USER = "What is two plus two?"
PROBE_REPLY = "four"
# A tail the engine could not give (it was down, or refused the probe) is asked for again after
# this many seconds; a template without a tail is never asked again.
RETRY_AFTER_S = 30.0


@dataclass(frozen=True, slots=True)
class ReplyIds:
    """A reply's prompt and its own tokens, as the engine counted them."""

    prompt: tuple[int, ...]
    reply: tuple[int, ...]


def _int_list(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        return None
    return tuple(value)


def reply_ids(endpoint: str, answer: dict[str, Any], choice: dict[str, Any]) -> ReplyIds | None:
    """The ids of `choice` (one of `answer`'s) for a verify prompt, or None when they are not
    exactly its text (see the module docstring) or the engine did not send them."""
    prompt = _int_list(answer.get("prompt_token_ids") if endpoint == "chat"
                       else choice.get("prompt_token_ids"))
    tokens = _int_list(choice.get("token_ids"))
    if not prompt or tokens is None:
        return None
    if endpoint == "chat":
        message = choice.get("message")
        if not isinstance(message, dict) or message.get("tool_calls") or \
                message.get("reasoning_content") or message.get("reasoning"):
            return None
    finish, stop = choice.get("finish_reason"), choice.get("stop_reason")
    if finish == "length" and stop is None:
        return ReplyIds(prompt, tokens)
    if finish == "stop" and (stop is None or type(stop) is int) and tokens:
        return ReplyIds(prompt, tokens[:-1])  # the end-of-sequence or stop token
    return None


@dataclass
class VerifyTails:
    """The tail ids of one tier's verify prompts, learned from its engine once (per endpoint
    and question). Concurrent first requests share one lookup."""

    _known: dict[tuple[str, str], tuple[int, ...] | None] = field(default_factory=dict)
    _pending: dict[tuple[str, str], asyncio.Task[tuple[int, ...] | None]] = field(
        default_factory=dict)
    _retry_at: dict[tuple[str, str], float] = field(default_factory=dict)

    async def tail(self, upstream: UpstreamClient, model: str, endpoint: str,
                   question: str) -> tuple[int, ...] | None:
        """The ids to append after the reply (`question`: chat's user turn, or completions'
        whole suffix); None when verify must use the text prompt."""
        key = (endpoint, question)
        if key in self._known:
            return self._known[key]
        if time.monotonic() < self._retry_at.get(key, 0.0):
            return None
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(_learn(upstream, model, endpoint, question))
            self._pending[key] = task
        try:
            found = await asyncio.shield(task)
        except (UpstreamError, LookupError, TypeError, ValueError):
            self._retry_at[key] = time.monotonic() + RETRY_AFTER_S
            return None
        finally:
            if task.done():
                self._pending.pop(key, None)
        self._known[key] = found
        return found


async def _prompt_ids(upstream: UpstreamClient, path: str, body: dict[str, Any]
                      ) -> tuple[int, ...]:
    """The engine's ids of a prompt, from a 1-token request that returns them."""
    answer = await upstream.request_json(path, {**body, "max_tokens": 1, "temperature": 0,
                                                "return_token_ids": True, "stream": False})
    ids = _int_list(answer.get("prompt_token_ids") if path.startswith("chat")
                    else (answer.get("choices") or [{}])[0].get("prompt_token_ids"))
    if ids is None:
        raise ValueError("the engine did not return the prompt's token ids")
    return ids


async def _learn(upstream: UpstreamClient, model: str, endpoint: str, question: str
                 ) -> tuple[int, ...] | None:
    def alone(text: str) -> tuple[str, dict[str, Any]]:
        return "completions", {"model": model, "prompt": text, "add_special_tokens": False}

    if endpoint != "chat":
        return await _prompt_ids(upstream, *alone(question))
    user = [{"role": "user", "content": PROBE_USER}]
    opened, asked, reply = await asyncio.gather(
        _prompt_ids(upstream, "chat/completions", {"model": model, "messages": user}),
        _prompt_ids(upstream, "chat/completions", {
            "model": model, "messages": verify_messages(user, PROBE_REPLY, question)}),
        _prompt_ids(upstream, *alone(PROBE_REPLY)))
    return split_tail(opened, asked, reply)


def split_tail(opened: Sequence[int], asked: Sequence[int], reply: Sequence[int]
               ) -> tuple[int, ...] | None:
    """What `asked` (the verify conversation's ids) adds after `opened` (the conversation's,
    generation prompt included) and `reply` (the assistant turn's content); None when `asked`
    does not start with them."""
    head = len(opened) + len(reply)
    if len(asked) <= head or tuple(asked[:len(opened)]) != tuple(opened) or \
            tuple(asked[len(opened):head]) != tuple(reply):
        return None
    return tuple(asked[head:])
