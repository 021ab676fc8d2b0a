"""lerp/slerp: exact endpoints, geometry of slerp, the lerp fallback, extrapolation."""

from __future__ import annotations

import math

import torch

from calibserve.merge.interpolate import (
    InPlaceInterpolator,
    interpolate,
    slerp_coefficients,
    slerp_stats,
)


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(33, 17, generator=g), torch.randn(33, 17, generator=g)


def test_endpoints_are_the_parents_bit_for_bit() -> None:
    a, b = _pair()
    for method in ("linear", "slerp"):
        assert torch.equal(interpolate(a, b, 0.0, method), a)
        assert torch.equal(interpolate(a, b, 1.0, method), b)


def test_slerp_is_continuous_at_its_endpoints() -> None:
    a, b = _pair(1)
    assert torch.allclose(interpolate(a, b, 1e-7, "slerp"), a, atol=1e-5)
    assert torch.allclose(interpolate(a, b, 1 - 1e-7, "slerp"), b, atol=1e-5)


def test_lerp_matches_formula_and_extrapolates() -> None:
    a, b = _pair(2)
    for t in (0.3, 0.7, 1.5, -0.25):
        assert torch.allclose(interpolate(a, b, t), (1 - t) * a + t * b, atol=1e-6)


def test_slerp_keeps_unit_norm_between_orthogonal_unit_vectors() -> None:
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0])
    mid = interpolate(a, b, 0.5, "slerp")
    assert math.isclose(float(mid.norm()), 1.0, rel_tol=1e-6)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5), 0.0]))
    # lerp shrinks it: this is what slerp is for.
    assert float(interpolate(a, b, 0.5).norm()) < 0.75


def test_slerp_falls_back_to_lerp_for_nearly_parallel_tensors() -> None:
    a = torch.linspace(1, 2, 50)
    b = a * 1.01 + 1e-4
    assert slerp_coefficients(slerp_stats(a, b), 0.4) is None
    assert torch.equal(interpolate(a, b, 0.4, "slerp"), interpolate(a, b, 0.4, "linear"))
    zero = torch.zeros(5)
    assert slerp_coefficients(slerp_stats(zero, torch.ones(5)), 0.5) is None


def test_chunked_stats_add_up_to_whole_tensor_stats() -> None:
    a, b = _pair(3)
    whole = slerp_stats(a, b)
    parts = slerp_stats(a[:10], b[:10]) + slerp_stats(a[10:], b[10:])
    assert math.isclose(whole.dot, parts.dot, rel_tol=1e-12)
    assert math.isclose(whole.norm_a, parts.norm_a, rel_tol=1e-12)


def test_in_place_interpolator_overwrites_the_live_tensor_only() -> None:
    a, b = _pair(4)
    live = torch.nn.Parameter(torch.zeros_like(a), requires_grad=False)
    ptr = live.data_ptr()
    interp = InPlaceInterpolator([("w", live, a.clone(), b.clone())], "slerp")
    interp.set(0.25)
    assert live.data_ptr() == ptr  # no reallocation per point
    assert torch.allclose(live, interpolate(a, b, 0.25, "slerp"))
    interp.set(0.0)
    assert torch.equal(live, a)
    interp.set(1.0)
    assert torch.equal(live, b)
