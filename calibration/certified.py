"""Certified thresholds in the calibration document: what a fit adds, and what it must refuse.

`--threshold guaranteed --max-error ALPHA [--delta DELTA]` asks every fit (merge, `calibserve
calibrate`) to certify, per confidence method, the threshold of `calibration.guarantee` on the
method's calibrated confidence of its calibrate items, and to record it in the method's
`guarantees`; `--batch M` makes each a batch certificate (every batch of at least M kept
answers, not only the long-run rate). A method that cannot be certified gets a `not certified`
note instead; when that method is one the document serves (its `multiple_choice` or `free_form`
method), the fit is refused (`refusals`): a target no threshold can certify is said at fit
time, with the minimum escalation rate it would need, never discovered in production.
"""

from __future__ import annotations

from dataclasses import dataclass

from numpy.typing import ArrayLike

from calibserve.calibration.document import CalibrationDocument, Guarantee
from calibserve.calibration.errors import CalibrationError
from calibserve.calibration.guarantee import DEFAULT_DELTA, certify_threshold

__all__ = ["NOT_CERTIFIED", "NO_GUARANTEES", "GuaranteeTargets", "certified_thresholds", "refusals"]

NOT_CERTIFIED = "not certified"  # how a method's fit notes start when a target failed


@dataclass(frozen=True)
class GuaranteeTargets:
    """The error rates to certify (`--max-error`, none: no certification) at one `delta`;
    `batch` (`--batch`): certify every batch of at least that many kept answers, not only the
    long-run rate (`calibration.guarantee`: batch certificates)."""

    max_errors: tuple[float, ...] = ()
    delta: float = DEFAULT_DELTA
    batch: int | None = None

    def __post_init__(self) -> None:
        for a in self.max_errors:
            if not 0.0 < a < 1.0:
                raise CalibrationError(f"max_error must be strictly between 0 and 1, got {a!r}")
        if not 0.0 < self.delta < 1.0:
            raise CalibrationError(f"delta must be strictly between 0 and 1, got {self.delta!r}")
        if self.batch is not None:
            if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
                raise CalibrationError(f"batch must be a whole number of kept answers >= 1, "
                                       f"got {self.batch!r}")
            if not self.max_errors:
                raise CalibrationError("batch needs a max_error to certify")

    def __bool__(self) -> bool:
        return bool(self.max_errors)


NO_GUARANTEES = GuaranteeTargets()


def certified_thresholds(calibrated: ArrayLike, correct: ArrayLike, targets: GuaranteeTargets
                         ) -> tuple[list[Guarantee], list[str]]:
    """One `Guarantee` per max_error that can be certified on these items, and a note for
    each that cannot (`not certified: max_error A: why`)."""
    entries: list[Guarantee] = []
    notes: list[str] = []
    for alpha in targets.max_errors:
        cert = certify_threshold(calibrated, correct, alpha, targets.delta,
                                 batch=targets.batch)
        if cert.certified:
            entries.append(Guarantee.from_certificate(cert))
        else:
            notes.append(f"{NOT_CERTIFIED}: max_error {alpha:g}: {cert.refusal()}")
    return entries, notes


def refusals(doc: CalibrationDocument, targets: GuaranteeTargets) -> list[str]:
    """Why `doc` cannot serve `--threshold guaranteed` for `targets`: one message per served
    method (multiple_choice, free_form) that was fitted but has no certificate for a target."""
    out = []
    for name in dict.fromkeys((doc.multiple_choice, doc.free_form)):
        entry = doc.methods.get(name)
        if entry is None or entry.fit is None or entry.fit.n == 0 or not entry.calibrated:
            continue  # not fitted here (no data of its kind): served uncalibrated, not certified
        have = {round(g.max_error, 12) for g in entry.guarantees}
        for alpha in targets.max_errors:
            if round(alpha, 12) in have:
                continue
            why = next((n.split(": ", 2)[-1] for n in entry.fit.notes or []
                        if n.startswith(f"{NOT_CERTIFIED}: max_error {alpha:g}:")),
                       "no certificate was computed")
            out.append(f"{alpha:g} for method {name!r}: {why}")
    return out
