"""Seed 004's calibration-aware losses (CFT, RCFT) against hand computations and behaviour."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibserve.calibration.metrics import bin_stats, ece
from calibserve.tune.calibration_aware import (
    CALIBRATION_LOSS_SCALE,
    MODES,
    N_BINS,
    BinAccuracy,
    OptionView,
    calibration_aware_loss,
    calibration_loss,
    needs_bins,
    option_view,
)

NEG = -math.inf

# Five items, four options; item 1 has no third option. Their top-option probabilities are
# 0.710, 0.532, 0.862, 0.316 and 0.917 (bins 7, 5, 8, 3 and 9 of ten).
LOGITS = [
    [2.0, 0.5, -1.0, 0.0],
    [0.2, 1.5, NEG, 1.0],
    [3.0, -0.5, 0.1, 0.4],
    [0.3, 0.1, 0.0, -0.2],
    [4.0, 1.0, 0.5, -0.5],
]
GOLD = [0, 1, 3, 0, 0]
# The E step's table (an input here): bin 3 is empty, so item 3 gets no calibration term; bin 9
# is all correct, so item 4's non-top targets are 0; bin 8 is overconfident (accuracy 0.4).
COUNTS = [2.0, 3.0, 1.0, 0.0, 6.0, 8.0, 9.0, 10.0, 5.0, 4.0]
CORRECTS = [0.0, 1.0, 0.0, 0.0, 3.0, 4.0, 5.0, 6.0, 2.0, 4.0]


def _bins(counts: list[float] = COUNTS, corrects: list[float] = CORRECTS) -> BinAccuracy:
    c = torch.tensor(counts, dtype=torch.float64)
    return BinAccuracy(
        counts=c,
        corrects=torch.tensor(corrects, dtype=torch.float64),
        confidence_sums=c * 0.5,
    )


def _view(requires_grad: bool = False) -> tuple[OptionView, torch.Tensor]:
    logits = torch.tensor(LOGITS, dtype=torch.float32, requires_grad=requires_grad)
    return OptionView(logits=logits, gold=torch.tensor(GOLD)), logits


def _hand_terms(
    counts: list[float] = COUNTS, corrects: list[float] = CORRECTS
) -> list[tuple[float, list[float], list[float]]]:
    """Per item, by hand: (weight 1 / N_k or 0, probabilities, targets), absent options -> 0."""
    out = []
    for row in LOGITS:
        present = [j for j, z in enumerate(row) if z != NEG]
        exps = {j: math.exp(row[j]) for j in present}
        total = sum(exps.values())
        p = [exps[j] / total if j in exps else 0.0 for j in range(len(row))]
        top = max(present, key=lambda j: p[j])
        k = min(int(p[top] * 10), 9)
        n = counts[k]
        a = corrects[k] / n if n > 0 else 0.0
        others = [j for j in present if j != top]
        m = len(others)
        second = max(p[j] for j in others)
        target = [0.0] * len(row)
        target[top] = a
        if a < 1.0:
            # gamma = ln(3) / (second * (1 - a)); t_j = (1 - a)(tanh(gamma p_j) + 1) / (T + m)
            gamma = math.log(3.0) / (second * (1.0 - a))
            tanhs = {j: math.tanh(gamma * p[j]) for j in others}
            big_t = sum(tanhs.values())
            for j in others:
                target[j] = (1.0 - a) * (tanhs[j] + 1.0) / (big_t + m)
        weight = 1.0 / n if n > 0 else 0.0
        out.append((weight, p, target))
    return out


def _hand_loss(counts: list[float] = COUNTS, corrects: list[float] = CORRECTS) -> float:
    total = 0.0
    for weight, p, target in _hand_terms(counts, corrects):
        total += weight * sum((pj - tj) ** 2 for pj, tj in zip(p, target, strict=True))
    return total


def test_hand_computation_is_not_degenerate() -> None:
    terms = _hand_terms()
    assert [w for w, _, _ in terms] == [1 / 10, 1 / 8, 1 / 5, 0.0, 1 / 4]
    # targets form a distribution (top: the bin's accuracy; the rest share 1 - accuracy)
    for _, _, target in terms:
        assert sum(target) == pytest.approx(1.0) or sum(target) == pytest.approx(0.0)
    # item 4's bin is all correct: every non-top target is 0
    assert terms[4][2][1:] == [0.0, 0.0, 0.0]
    # the non-top targets keep the order of the probabilities (item 0: options 1 > 3 > 2)
    t0 = terms[0][2]
    assert t0[1] > t0[3] > t0[2] > 0.0


def test_rcft_equals_hand_computation() -> None:
    view, _ = _view()
    bins = _bins()
    sft = torch.tensor(1.75)
    alpha = 0.3
    hand_cal = _hand_loss()
    assert hand_cal > 0.0
    got_cal = calibration_loss(view, bins)
    assert got_cal.item() == pytest.approx(hand_cal, rel=1e-5)
    total = calibration_aware_loss(sft, view, bins, "rcft", alpha)
    expected = (1 - alpha) * 1.75 + alpha * 1e-3 * hand_cal
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert CALIBRATION_LOSS_SCALE == 1e-3


def test_cft_is_the_sft_loss() -> None:
    view, _ = _view()
    sft = torch.tensor(0.9, requires_grad=True)
    for alpha in (0.0, 0.5, 1.0):
        assert calibration_aware_loss(sft, view, None, "cft", alpha) is sft
    assert not needs_bins("cft")
    assert needs_bins("rcft")
    assert MODES == ("cft", "rcft")


def test_alpha_zero_gives_back_sft_and_alpha_one_the_scaled_term() -> None:
    view, _ = _view()
    bins = _bins()
    sft = torch.tensor(2.5)
    assert torch.equal(calibration_aware_loss(sft, view, bins, "rcft", 0.0), sft)
    only_cal = calibration_aware_loss(sft, view, bins, "rcft", 1.0)
    assert only_cal.item() == pytest.approx(1e-3 * _hand_loss(), rel=1e-5)


def test_a_batch_without_multiple_choice_rows_adds_nothing() -> None:
    empty = option_view(
        torch.zeros(0, 8), torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    )
    assert calibration_loss(empty, _bins()).item() == 0.0
    total = calibration_aware_loss(torch.tensor(2.0), empty, _bins(), "rcft", 0.25)
    assert total.item() == pytest.approx(0.75 * 2.0)


def test_bad_arguments_are_refused() -> None:
    view, _ = _view()
    sft = torch.tensor(1.0)
    with pytest.raises(ValueError, match="mode"):
        calibration_aware_loss(sft, view, _bins(), "ece", 0.5)
    with pytest.raises(ValueError, match="alpha"):
        calibration_aware_loss(sft, view, _bins(), "rcft", 1.5)
    with pytest.raises(ValueError, match="BinAccuracy"):
        calibration_aware_loss(sft, view, None, "rcft", 0.5)


def _hand_gradient() -> np.ndarray:
    """d L_cal / d logits with the targets held fixed: softmax Jacobian times 2 w (p - t)."""
    grads = []
    for weight, p, target in _hand_terms():
        g = [2.0 * weight * (pj - tj) for pj, tj in zip(p, target, strict=True)]
        mean = sum(pj * gj for pj, gj in zip(p, g, strict=True))
        grads.append([pl * (gl - mean) for pl, gl in zip(p, g, strict=True)])
    return np.array(grads)


def test_gradient_flows_through_probabilities_only() -> None:
    view, logits = _view(requires_grad=True)
    bins = _bins()
    calibration_loss(view, bins).backward()
    assert logits.grad is not None
    np.testing.assert_allclose(logits.grad.numpy(), _hand_gradient(), rtol=1e-4, atol=1e-7)
    # the item whose bin was empty at the E step gets no gradient; neither does an absent option
    assert torch.count_nonzero(logits.grad[3]) == 0
    assert logits.grad[1, 2] == 0
    assert not bins.counts.requires_grad and not bins.corrects.requires_grad


def test_attached_targets_change_the_gradient_not_the_value() -> None:
    # The released code does not detach the non-top targets; that is an option here.
    detached_view, detached = _view(requires_grad=True)
    attached_view, attached = _view(requires_grad=True)
    a = calibration_loss(detached_view, _bins())
    b = calibration_loss(attached_view, _bins(), detach_targets=False)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    a.backward()
    b.backward()
    assert detached.grad is not None and attached.grad is not None
    assert not torch.allclose(detached.grad, attached.grad, atol=1e-6)
    # through the targets, only the non-top logits move: the top logit's gradient is unchanged
    top = torch.tensor(LOGITS).argmax(dim=1)
    rows = torch.arange(len(LOGITS))
    torch.testing.assert_close(detached.grad[rows, top], attached.grad[rows, top])


def test_top_bin_quirk_and_min_count() -> None:
    view, _ = _view()
    # the released code never regularises the last bin: item 4 (bin 9) drops out
    hand_without_top = _hand_loss() - sum(
        w * sum((pj - tj) ** 2 for pj, tj in zip(p, t, strict=True))
        for w, p, t in _hand_terms()[4:]
    )
    got = calibration_loss(view, _bins(), regularise_top_bin=False)
    assert got.item() == pytest.approx(hand_without_top, rel=1e-5)
    # a floor of 6 E-step items drops bins 8 (5 items) and 9 (4 items): items 2 and 4
    terms = _hand_terms()
    kept = sum(
        w * sum((pj - tj) ** 2 for pj, tj in zip(p, t, strict=True))
        for i, (w, p, t) in enumerate(terms)
        if i in (0, 1)
    )
    assert calibration_loss(view, _bins(), min_count=6).item() == pytest.approx(kept, rel=1e-5)


def _two_option_logits(conf: float) -> list[float]:
    return [math.log(conf), math.log(1.0 - conf)]


def test_estimate_gives_known_per_bin_accuracy() -> None:
    # Batch 1: two options. Batch 2: three options, the last absent for two rows.
    batch1 = OptionView(
        logits=torch.tensor(
            [
                [0.0, 0.0],  # conf exactly 0.5 (a tie: the first option), bin 5, gold 0: right
                _two_option_logits(0.55),  # bin 5, predicted 0, gold 1: wrong
                _two_option_logits(0.72),  # bin 7, right
                _two_option_logits(0.95),  # bin 9, wrong
                [1.3, NEG],  # one option: conf exactly 1.0, last bin, right
            ]
        ),
        gold=torch.tensor([0, 1, 0, 1, 0]),
    )
    batch2 = OptionView(
        logits=torch.tensor(
            [
                [math.log(0.35), math.log(0.65), NEG],  # bin 6, predicted 1, right
                [math.log(0.05), math.log(0.2), math.log(0.75)],  # bin 7, predicted 2, wrong
                [math.log(0.02), math.log(0.98), NEG],  # bin 9, right
            ]
        ),
        gold=torch.tensor([1, 0, 1]),
    )
    bins = BinAccuracy.estimate(iter([batch1, batch2]))
    expected_counts = [0, 0, 0, 0, 0, 2, 1, 2, 0, 3]
    expected_correct = [0, 0, 0, 0, 0, 1, 1, 1, 0, 2]
    assert bins.counts.tolist() == expected_counts
    assert bins.corrects.tolist() == expected_correct
    pairs = zip(expected_correct, expected_counts, strict=True)
    expected_accuracy = [c / n if n else 0.0 for c, n in pairs]
    np.testing.assert_allclose(bins.accuracy.numpy(), expected_accuracy)
    assert bins.populated.tolist() == [n > 0 for n in expected_counts]
    assert bins.total == 8
    np.testing.assert_allclose(
        bins.confidence_sums.numpy()[[5, 6, 7, 9]],
        [0.5 + 0.55, 0.65, 0.72 + 0.75, 0.95 + 1.0 + 0.98],
        rtol=1e-6,
    )


def test_estimate_runs_without_gradient_and_tolerates_empty_input() -> None:
    weights = torch.randn(3, 4, requires_grad=True)

    def forward() -> Iterator[OptionView]:
        for _ in range(2):
            yield OptionView(logits=weights * 2.0, gold=torch.tensor([0, 1, 2]))
            assert not torch.is_grad_enabled()  # the lazy forward ran under no_grad

    bins = BinAccuracy.estimate(forward())
    assert bins.total == 6 and not bins.counts.requires_grad
    empty = BinAccuracy.estimate([])
    assert empty.total == 0 and empty.n_bins == N_BINS
    assert empty.accuracy.tolist() == [0.0] * N_BINS
    assert empty.ece() == 0.0


def test_bins_agree_with_calibserve_metrics() -> None:
    rng = np.random.default_rng(7)
    conf = rng.uniform(0.25, 1.0, size=500)
    correct = rng.uniform(size=500) < conf
    bins = BinAccuracy.from_confidences(torch.tensor(conf), torch.tensor(correct), n_bins=10)
    counts, conf_sum, correct_sum = bin_stats(conf, correct.astype(float), n_bins=10)
    np.testing.assert_allclose(bins.counts.numpy(), counts)
    np.testing.assert_allclose(bins.corrects.numpy(), correct_sum)
    np.testing.assert_allclose(bins.confidence_sums.numpy(), conf_sum)
    assert bins.ece() == pytest.approx(ece(conf, correct.astype(float), n_bins=10))
    summary = bins.to_dict()
    assert json.loads(json.dumps(summary))["ece"] == pytest.approx(bins.ece())


def test_option_view_gathers_letters_and_masks_padding() -> None:
    reply = torch.arange(16, dtype=torch.float32).reshape(2, 8).requires_grad_(True)
    ids = torch.tensor([[3, 5, 1, -1], [2, 7, 0, 4]])
    view = option_view(reply, ids, torch.tensor([1, 3]))
    assert view.logits[0].tolist() == [3.0, 5.0, 1.0, NEG]
    assert view.logits[1].tolist() == [10.0, 15.0, 8.0, 12.0]
    assert view.present.tolist() == [[True, True, True, False], [True, True, True, True]]
    probs = view.probabilities()
    assert probs[0, 3] == 0.0
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    view.logits.sum().backward()
    assert reply.grad is not None
    touched = (reply.grad != 0).nonzero().tolist()
    assert touched == [[0, 1], [0, 3], [0, 5], [1, 0], [1, 2], [1, 4], [1, 7]]
    # one id list for every row
    shared = option_view(reply.detach(), torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert shared.logits.tolist() == [[0.0, 1.0], [8.0, 9.0]]


def test_option_view_refuses_inconsistent_options() -> None:
    reply = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="absent"):
        option_view(reply, torch.tensor([[3, 5, -1], [2, 7, 0]]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="token ids"):
        option_view(reply, torch.tensor([[3, 8], [2, 7]]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="share"):
        option_view(reply, torch.tensor([[3, 3], [2, 7]]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="at least one"):
        OptionView(logits=torch.tensor([[NEG, NEG]]), gold=torch.tensor([0]))


def _overconfident_world() -> tuple[torch.Tensor, torch.Tensor]:
    """400 items, four options, 60% right, every top option at about 0.96."""
    g = torch.Generator().manual_seed(0)
    n, k = 400, 4
    gold = torch.randint(0, k, (n,), generator=g)
    right = torch.rand(n, generator=g) < 0.6
    predicted = torch.where(right, gold, (gold + torch.randint(1, k, (n,), generator=g)) % k)
    logits = torch.randn(n, k, generator=g) * 0.3
    logits[torch.arange(n), predicted] += 4.5
    return logits, gold


def _ece_and_accuracy(logits: torch.Tensor, gold: torch.Tensor) -> tuple[float, float]:
    conf, predicted = torch.softmax(logits, dim=-1).max(dim=-1)
    correct = (predicted == gold).numpy().astype(float)
    return ece(conf.numpy(), correct, n_bins=10), float(correct.mean())


def _descend(regularise_top_bin: bool, steps: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    start, gold = _overconfident_world()
    logits = torch.nn.Parameter(start.clone())
    bins = BinAccuracy.estimate([OptionView(logits.detach(), gold)])  # the E step, once
    optimiser = torch.optim.Adam([logits], lr=0.1)
    for _ in range(steps):
        optimiser.zero_grad()
        sft = F.cross_entropy(logits, gold)
        loss = calibration_aware_loss(
            sft,
            OptionView(logits, gold),
            bins,
            "rcft",
            1.0,
            regularise_top_bin=regularise_top_bin,
        )
        loss.backward()
        optimiser.step()
    return logits.detach(), gold


def test_descent_on_the_calibration_loss_reduces_ece() -> None:
    start, gold = _overconfident_world()
    ece_before, accuracy_before = _ece_and_accuracy(start, gold)
    assert ece_before > 0.3  # the setup is overconfident
    tuned, _ = _descend(regularise_top_bin=True)
    ece_after, accuracy_after = _ece_and_accuracy(tuned, gold)
    assert ece_after < 0.8 * ece_before
    # the targets keep the options' order: the predictions, hence accuracy, do not move
    assert accuracy_after == accuracy_before
    # with the released code's off-by-one every item sits in the unregularised top bin
    untouched, _ = _descend(regularise_top_bin=False)
    torch.testing.assert_close(untouched, start)
