"""Streaming modes of a route, parsed from config strings `buffer`, `prefix:N` and `off`.

- `buffer` (default): read the primary's whole answer, decide on its confidence, then stream the
  winner (the primary's held chunks, or the stronger tier live). The default because the decision
  uses the same whole-answer confidence that calibration.json was fitted on and that the client
  is shown, and the client never sees an answer it is then told to disregard. Cost: time to first
  token becomes the primary's whole generation time (short for the answers escalation is for).
- `prefix:N`: hold the first N tokens of every choice, decide on their confidence, then stream on
  (held tokens first) or switch tiers before the client has seen anything. Lower latency for long
  answers; the decision uses a prefix confidence, which is calibrated only if the calibration's
  method looks at the first tokens (e.g. `answer`/`first`, where prefix:1 decides exactly).
- `off`: stream the primary as it comes, confidence on the finish chunk; never escalates on
  confidence (falling back when the primary is down still works).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class StreamMode:
    kind: Literal["buffer", "prefix", "off"]
    prefix_tokens: int = 0

    @classmethod
    def parse(cls, value: str | StreamMode) -> StreamMode:
        if isinstance(value, StreamMode):
            return value
        text = value.strip().lower()
        if text == "buffer":
            return cls("buffer")
        if text == "off":
            return cls("off")
        if text.startswith("prefix:"):
            try:
                n = int(text.split(":", 1)[1])
            except ValueError:
                n = 0
            if n >= 1:
                return cls("prefix", n)
        raise ValueError(
            f"stream mode must be 'buffer', 'prefix:N' (N >= 1) or 'off', got {value!r}"
        )

    def __str__(self) -> str:
        return f"prefix:{self.prefix_tokens}" if self.kind == "prefix" else self.kind


BUFFER = StreamMode("buffer")
OFF = StreamMode("off")
