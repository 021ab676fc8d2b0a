"""Weight interpolation: `lerp` and `slerp` of two tensors, and in-place sweeps of a model.

theta(l) = (1 - l) * base + l * aligned, or spherical interpolation per tensor, which keeps the
norm of the interpolated weights from shrinking between two far-apart directions. Both allow
extrapolation (l > 1 or l < 0). At l = 0 and l = 1 both return the parents bit for bit (torch's
lerp switches formula at 0.5 to be exact at both ends; slerp is special-cased).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "Method",
    "SlerpStats",
    "slerp_stats",
    "slerp_coefficients",
    "interpolate",
    "interpolate_into",
    "InPlaceInterpolator",
]

Method = Literal["linear", "slerp"]
# Past this |cos| two tensors are nearly parallel: slerp's 1/sin(omega) blows up, lerp is the limit.
PARALLEL_COS = 0.9995


@dataclass(frozen=True, slots=True)
class SlerpStats:
    """Dot product and norms of a tensor pair (float64), enough to fix slerp's coefficients."""

    dot: float
    norm_a: float
    norm_b: float

    def __add__(self, other: SlerpStats) -> SlerpStats:
        # Partial sums over row chunks add up; the norms are kept squared until `finish`.
        return SlerpStats(
            self.dot + other.dot, self.norm_a + other.norm_a, self.norm_b + other.norm_b
        )


def slerp_stats(a: torch.Tensor, b: torch.Tensor) -> SlerpStats:
    """Partial statistics of one chunk: dot and *squared* norms (sum chunks, then use them)."""
    a64 = a.reshape(-1).to(torch.float64)
    b64 = b.reshape(-1).to(torch.float64)
    return SlerpStats(float(a64 @ b64), float(a64 @ a64), float(b64 @ b64))


def slerp_coefficients(stats: SlerpStats, t: float) -> tuple[float, float] | None:
    """(ca, cb) with slerp = ca * a + cb * b, or None when lerp applies (near-parallel, zero)."""
    na, nb = math.sqrt(stats.norm_a), math.sqrt(stats.norm_b)
    if na == 0.0 or nb == 0.0:
        return None
    cos = max(-1.0, min(1.0, stats.dot / (na * nb)))
    if abs(cos) > PARALLEL_COS:
        return None
    omega = math.acos(cos)
    so = math.sin(omega)
    return math.sin((1.0 - t) * omega) / so, math.sin(t * omega) / so


def interpolate_into(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    method: Method = "linear",
    stats: SlerpStats | None = None,
) -> torch.Tensor:
    """Write interp(a, b, t) into `out` (same dtype as a and b); `stats` of the whole tensor for
    slerp (computed here when not given, so pass it when `a`, `b` are chunks)."""
    if t == 0.0:
        return out.copy_(a)
    if t == 1.0:
        return out.copy_(b)
    if method == "slerp":
        coef = slerp_coefficients(stats if stats is not None else slerp_stats(a, b), t)
        if coef is not None:
            ca, cb = coef
            torch.mul(a, ca, out=out)
            return out.add_(b, alpha=cb)
    return torch.lerp(a, b, t, out=out)


def interpolate(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    method: Method = "linear",
    stats: SlerpStats | None = None,
) -> torch.Tensor:
    """interp(a, b, t) as a new tensor."""
    return interpolate_into(torch.empty_like(a), a, b, t, method, stats)


class InPlaceInterpolator:
    """Holds both parents and sets a model's own parameter tensors to theta(l), in place.

    Nothing is allocated per point: each call overwrites the live parameters, so a sweep point
    costs one pass over the weights, not a checkpoint write and reload.
    """

    def __init__(
        self,
        targets: Iterable[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]],
        method: Method = "linear",
    ) -> None:
        """`targets`: (name, live parameter, base, aligned), all the same shape and dtype."""
        self.method: Method = method
        self.targets = list(targets)
        for name, live, a, b in self.targets:
            if not (live.shape == a.shape == b.shape):
                raise ValueError(f"{name}: shapes differ {live.shape} {a.shape} {b.shape}")
        self.stats: dict[str, SlerpStats] = {}
        if method == "slerp":
            # The angle between parents is fixed: compute it once, not at every point.
            self.stats = {name: slerp_stats(a, b) for name, _, a, b in self.targets}
        self.current: float | None = None

    @torch.no_grad()
    def set(self, t: float) -> None:
        for name, live, a, b in self.targets:
            interpolate_into(live.data, a, b, t, self.method, self.stats.get(name))
        self.current = t
