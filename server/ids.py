"""HMAC-signed response ids: feedback works on any replica with no shared store.

An id keeps OpenAI's prefix (`chatcmpl-`, `cmpl-`) so SDKs and logs treat it as usual, and carries
what feedback needs: the model, the calibrated and raw confidence of each choice, the confidence
method of each choice (`k`; ids issued before it was added lack it and verify all the same: their
feedback is counted under the model's multiple-choice method), the issue time and a random nonce
(two identical answers still get different ids). Layout::

    <prefix><base64url(json payload)>.<base64url(HMAC-SHA256(key, prefix + payload)[:16])>

A 128-bit truncated tag is plenty against forgery and keeps ids short. Verification order:
malformed (cannot be parsed) -> `MalformedId`; the tag does not match (forged, truncated,
signed with another key) -> `ForgedId`; the caller then checks expiry and replay.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

PREFIXES = ("chatcmpl-", "cmpl-")
TAG_BYTES = 16
MAX_ID_CHARS = 4096


class ResponseIdError(ValueError):
    """Base class: an id that feedback cannot use."""


class MalformedId(ResponseIdError):
    """Not an id this server could have issued (wrong prefix, bad encoding, bad payload)."""


class ForgedId(ResponseIdError):
    """Well formed, but the signature does not match this deployment's key."""


@dataclass(frozen=True)
class IdClaims:
    """What a verified id says about the response it names."""

    prefix: str
    model: str
    scores: tuple[float, ...]  # calibrated confidence per choice index
    raws: tuple[float, ...]
    issued_at: float
    nonce: str
    methods: tuple[str, ...] | None = None  # per choice; None: an id from before methods

    def method(self, choice: int, default: str) -> str:
        """The confidence method of `choice` (`default` for an id that does not say)."""
        if self.methods is None or choice >= len(self.methods):
            return default
        return self.methods[choice]

    @property
    def score(self) -> float:
        return self.scores[0]


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ResponseIdSigner:
    """Issues and verifies signed ids with one HMAC key."""

    def __init__(self, key: str | bytes) -> None:
        self._key = key.encode() if isinstance(key, str) else key
        if not self._key:
            raise ValueError("signing key must not be empty")

    @staticmethod
    def random_key() -> str:
        return secrets.token_urlsafe(32)

    def _tag(self, prefix: str, payload: str) -> bytes:
        msg = (prefix + payload).encode("ascii")
        return hmac.new(self._key, msg, hashlib.sha256).digest()[:TAG_BYTES]

    def issue(
        self,
        prefix: str,
        model: str,
        scores: list[float],
        raws: list[float],
        now: float | None = None,
        methods: list[str] | None = None,
    ) -> str:
        if prefix not in PREFIXES:
            raise ValueError(f"unknown id prefix {prefix!r}")
        body = {
            "m": model,
            # Full precision (shortest round-trip repr): feedback records exactly what was served.
            "s": [float(s) for s in scores],
            "r": [float(r) for r in raws],
            "t": int(now if now is not None else time.time()),
            "n": os.urandom(6).hex(),
        }
        if methods is not None:
            body["k"] = [str(m) for m in methods]
        payload = _b64e(json.dumps(body, separators=(",", ":")).encode())
        return f"{prefix}{payload}.{_b64e(self._tag(prefix, payload))}"

    def verify(self, response_id: object) -> IdClaims:
        if not isinstance(response_id, str) or len(response_id) > MAX_ID_CHARS:
            raise MalformedId("response id must be a string of reasonable length")
        prefix = next((p for p in PREFIXES if response_id.startswith(p)), None)
        if prefix is None:
            raise MalformedId(f"response id must start with one of {', '.join(PREFIXES)}")
        payload, dot, tag_text = response_id[len(prefix):].partition(".")
        if not dot or not payload or not tag_text:
            raise MalformedId("response id is not a calibserve id (no signature part)")
        try:
            tag = _b64d(tag_text)
            raw_payload = _b64d(payload)
            payload.encode("ascii")
        except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
            raise MalformedId("response id is not valid base64url") from exc
        if len(tag) != TAG_BYTES:
            raise MalformedId("response id signature has the wrong length")
        if not hmac.compare_digest(tag, self._tag(prefix, payload)):
            raise ForgedId("response id signature does not match")
        try:
            body = json.loads(raw_payload)
            model = body["m"]
            scores = tuple(float(x) for x in body["s"])
            raws = tuple(float(x) for x in body["r"])
            issued_at = float(body["t"])
            nonce = str(body["n"])
            kinds = body.get("k")
            methods = None if kinds is None else tuple(str(k) for k in kinds)
        except (ValueError, KeyError, TypeError) as exc:  # signed by us, so this is a bug
            raise MalformedId("response id payload is invalid") from exc
        if not isinstance(model, str) or not scores:
            raise MalformedId("response id payload is invalid")
        return IdClaims(prefix, model, scores, raws, issued_at, nonce, methods)


class ReplayGuard:
    """Remembers used ids for their lifetime, in bounded memory, so each counts once.

    When full, the oldest entry is evicted and the guard raises its `horizon` to that entry's
    issue time: ids issued at or before the horizon are then refused as too old. So an evicted id
    can never be replayed, at the cost of closing the feedback window early under a flood.
    """

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.horizon = float("-inf")
        self._seen: OrderedDict[str | bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def expired(self, issued_at: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return issued_at <= self.horizon or issued_at < now - self.ttl_s

    def seen(self, key: str | bytes) -> bool:
        return key in self._seen

    def add(self, key: str | bytes, issued_at: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._seen[key] = issued_at
        # Entries are added in arrival order, not issue order: evict from the front while they are
        # past their TTL, then by capacity.
        while self._seen:
            first_key, first_issued = next(iter(self._seen.items()))
            if first_issued < now - self.ttl_s:
                self._seen.popitem(last=False)
            elif len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
                self.horizon = max(self.horizon, first_issued)
            else:
                break
