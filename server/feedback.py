"""Feedback: turn `{"id", "correct"}` into per-bin calibration counters, once per response.

Everything needed is inside the signed id (model and served confidence), so any replica accepts
feedback for any response. Rejections never touch the counters and are counted by outcome:

- 400 `malformed`: not a calibserve id (wrong prefix, truncated, bad encoding), bad choice index;
- 404 `forged`: well formed but the signature does not verify (forged or signed with another key);
- 404 `unknown`: signed by this deployment but for a model not served here, or too old to accept
  (past the feedback TTL or the replay memory's horizon);
- 409 `duplicate`: feedback for this id (and choice) was already accepted.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

from calibserve.calibration import N_BINS, bin_index
from calibserve.server.errors import APIError
from calibserve.server.ids import ForgedId, MalformedId, ReplayGuard, ResponseIdSigner
from calibserve.server.metrics import ServerMetrics
from calibserve.server.openai_schema import FeedbackRequest, FeedbackResponse


def replay_key(response_id: str, choice: int) -> bytes:
    """16 bytes naming (id, choice) in the replay memory: a full id is ~175 characters, and a
    full guard (200,000 entries by default) then holds ~24 MiB instead of ~56 MiB
    (benchmarks/RESULTS.md, "Replay memory"; the script: benchmarks/replay_memory.py at
    1c35067)."""
    return hashlib.blake2b(f"{response_id}#{choice}".encode(), digest_size=16).digest()


class FeedbackRecorder:
    """Verifies ids, refuses replays, and records accepted feedback in the metrics."""

    def __init__(
        self,
        signer: ResponseIdSigner,
        metrics: ServerMetrics,
        models: set[str],
        ttl_s: float,
        memory: int,
        multiple_choice: dict[str, str] | None = None,
    ) -> None:
        self.signer = signer
        self.metrics = metrics
        self.models = models
        # Per model label: the method an id that names none is counted under (ids issued
        # before ids carried the method were all scored as option letters).
        self.multiple_choice = multiple_choice or {}
        self.guard = ReplayGuard(memory, ttl_s)
        self._lock = threading.Lock()
        # Called with (model label, method, raw confidence, correct) of each accepted feedback
        # (online recalibration refits on it).
        self.on_outcome: Callable[[str, str, float, bool], None] | None = None

    def _reject(self, model: str, outcome: str, status: int, message: str, code: str) -> APIError:
        self.metrics.feedback.labels(model, outcome).inc()
        return APIError(status, message, param="id", code=code)

    def record(self, request: FeedbackRequest) -> FeedbackResponse:
        if (request.correct is None) == (request.score is None):
            # Counted as malformed: the body is well typed but says nothing usable.
            raise self._reject("", "malformed", 400, "give exactly one of `correct` or `score`",
                               "invalid_feedback")
        correct = bool(request.correct) if request.correct is not None else request.score == 1
        try:
            claims = self.signer.verify(request.id)
        except MalformedId as exc:
            raise self._reject("", "malformed", 400, f"malformed response id: {exc}",
                               "malformed_response_id") from exc
        except ForgedId as exc:
            raise self._reject("", "forged", 404, "no response with this id was issued by this "
                               "deployment (signature does not verify)",
                               "unknown_response_id") from exc
        model = claims.model
        if model not in self.models:
            raise self._reject("", "unknown", 404, f"model {model!r} is not served here",
                               "model_not_found")
        if request.choice >= len(claims.scores):
            raise self._reject(model, "malformed", 400,
                               f"choice {request.choice} out of range (n={len(claims.scores)})",
                               "invalid_choice")
        confidence = claims.scores[request.choice]
        key = replay_key(request.id, request.choice)
        with self._lock:
            if self.guard.seen(key):
                raise self._reject(model, "duplicate", 409,
                                   "feedback for this response was already recorded",
                                   "duplicate_feedback")
            if self.guard.expired(claims.issued_at):
                raise self._reject(model, "unknown", 404,
                                   "this response is too old to accept feedback for",
                                   "response_id_expired")
            self.guard.add(key, claims.issued_at)
            method = claims.method(request.choice, self.multiple_choice.get(model, "answer"))
            self.metrics.record_feedback(model, confidence, correct, method)
        if self.on_outcome is not None and request.choice < len(claims.raws):
            self.on_outcome(model, method, claims.raws[request.choice], correct)
        return FeedbackResponse(
            id=request.id, model=model, confidence=confidence, correct=correct,
            bin=int(bin_index([confidence], n_bins=N_BINS)[0]), method=method,
        )
