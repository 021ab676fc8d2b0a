"""Label-free option temperature: DACA, the base model as the calibrator of the aligned one.

DACA (Disagreement-Aware Confidence Alignment; Luo, Wang, Li, Wei, "Your Pre-trained LLM is
Secretly an Unsupervised Confidence Calibrator", NeurIPS 2025, arXiv 2505.16690; code
github.com/ml-stat-Sustech/Disagreement-Aware-Calibration) fits the aligned (post-trained) model's
softmax temperature with no labels. A pre-trained model is usually well calibrated and its
post-trained descendant over-confident; on unlabelled multiple-choice prompts, T is chosen so
that the aligned model's tempered option distribution matches the base model's:

    T* = argmin_T  mean over agreeing items i of  CE(p_base(i), softmax(z_aligned(i) / T))
       = argmin_T  mean_i  - sum_k p_base(i)_k * log softmax(z_aligned(i) / T)_k

The target is the base model's whole option distribution at temperature 1 (soft labels, not its
argmax); only the aligned model is tempered. An item is used only where the two models pick the
same option (argmax of the base's and of the aligned model's option distribution at T = 1):
on an item where they disagree, the base's probability of the aligned model's answer is below
that answer's accuracy (the paper's argument), so fitting on it pushes T too high and the
aligned model ends under-confident. Disagreeing items are dropped from the objective, not
reweighted.

What the released code does (calibration/optimization.py, `loss_function`), and where this
module differs:
- same target and same filter: `softmax(logits_pre)` against `softmax(logits_post / T)`, the mask
  `argmax(logits_post) == argmax(logits_pre)`, disagreeing rows contribute zero;
- the code averages over every row of a mini-batch (zeros included); the minimiser over the full
  data is the same as that of the mean over the agreeing rows, which is what is minimised here;
- the code clamps both distributions to [1e-8, 1 - 1e-8] before the log; here the cross-entropy
  is exact (log-softmax), and an option the aligned model can never give (no finite logprob at
  any T: absent from its logprobs) is left out of the sum, which is what the clamp amounts to
  for such an option (a term that does not depend on T);
- the code optimises T itself with Adam (lr 0.1, 400 epochs of shuffled batches of 256, from
  T = 1); here T is found by the golden-section search on log T in [0.01, 100] that
  `OptionTemperature` uses, deterministic, and never worse than T = 1 on the objective;
- the code reads one token per option (the four letters' logprobs under guided decoding) and
  asks both models the same plain-text prompt; here each option may have several tokens (`A`,
  `▁A`, ...) whose tempered probabilities are added up as `answer_confidence` serves them, and
  the prompts are whatever the caller scored (calibserve: the served model's chat template for
  both models, as merge scores the base at lambda 0).

The fitted T is the `answer` method's `params.temperature`, served exactly as a labelled
`OptionTemperature` is; the calibration document records `fit.labels: "none"` and the agreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from calibserve.calibration._inputs import FloatArray
from calibserve.calibration.calibrators import (
    TemperatureScaling,
    _option_log_probs,
    _option_matrix,
)
from calibserve.calibration.errors import DegenerateDataError

__all__ = ["DacaFit", "agreement", "fit_daca", "fit_daca_temperature"]


@dataclass(frozen=True)
class DacaFit:
    """A DACA fit: the temperature, the items given (`n`), those fitted on (`n_agree`: both
    models picked the same option and both have a usable distribution) and `agreement`
    (n_agree / the items where both have a usable distribution)."""

    temperature: float
    n: int
    n_agree: int
    n_usable: int

    @property
    def agreement(self) -> float:
        return self.n_agree / self.n_usable if self.n_usable else 0.0


@dataclass(frozen=True)
class _Pair:
    """Both models' option log-probabilities at T = 1 over k options, and who agrees."""

    aligned: FloatArray  # the aligned model's token logprobs [n, m]
    groups: NDArray[np.intp]
    k: int
    aligned_lp: FloatArray  # [n, k]
    base_lp: FloatArray  # [n, k]
    usable: NDArray[np.bool_]
    agree: NDArray[np.bool_]


def _pad(lp: FloatArray, k: int) -> FloatArray:
    if lp.shape[1] == k:
        return lp
    out: FloatArray = np.concatenate([lp, np.full((lp.shape[0], k - lp.shape[1]), -np.inf)], 1)
    return out


def _pair(aligned_logits: ArrayLike, base_logits: ArrayLike, groups: ArrayLike | None,
          base_groups: ArrayLike | None) -> _Pair:
    za, ga, ka = _option_matrix(aligned_logits, groups)
    zb, gb, kb = _option_matrix(base_logits, groups if base_groups is None else base_groups)
    if za.shape[0] != zb.shape[0]:
        raise DegenerateDataError(
            f"aligned and base logits differ in length ({za.shape[0]} != {zb.shape[0]})")
    k = max(ka, kb)
    with np.errstate(invalid="ignore"):  # a row with no option at all: NaN, made -inf
        la, lb = _option_log_probs(za, ga, k, 1.0), _option_log_probs(zb, gb, k, 1.0)
    la, lb = np.where(np.isnan(la), -np.inf, la), np.where(np.isnan(lb), -np.inf, lb)
    usable: NDArray[np.bool_] = np.asarray(
        np.isfinite(la).any(axis=1) & np.isfinite(lb).any(axis=1), dtype=bool)
    # Ties go to the earlier option (np.argmax), as merge's evaluator predicts.
    agree: NDArray[np.bool_] = usable & (np.argmax(la, axis=1) == np.argmax(lb, axis=1))
    return _Pair(za, ga, k, la, lb, usable, agree)


def agreement(
    aligned_logits: ArrayLike,
    base_logits: ArrayLike,
    groups: ArrayLike | None = None,
    *,
    base_groups: ArrayLike | None = None,
) -> NDArray[np.bool_]:
    """Per item: do both models pick the same option (the argmax of the option distribution at
    T = 1)? False where either has no finite option. Arguments as `fit_daca`'s."""
    return _pair(aligned_logits, base_logits, groups, base_groups).agree


def fit_daca(
    aligned_logits: ArrayLike,
    base_logits: ArrayLike,
    groups: ArrayLike | None = None,
    *,
    base_groups: ArrayLike | None = None,
    agreement_only: bool = True,
) -> DacaFit:
    """DACA's temperature for the aligned model (see the module docstring).

    `aligned_logits` `[n, m]` and `base_logits` `[n, m']`: the option-letter token logprobs of
    the same n prompts (-inf or vLLM's -9999 where a token is absent); `groups[c]` the option
    index of the aligned column c (default: one column per option), `base_groups` the same for
    the base's columns (default: `groups`). Raises `DegenerateDataError` when no item agrees.
    `agreement_only=False` fits on every usable item (the paper's "naive" alignment, which it
    shows under-confident: for comparisons only; `n_agree` then counts the items fitted on).
    """
    pair = _pair(aligned_logits, base_logits, groups, base_groups)
    agree = pair.agree if agreement_only else pair.usable
    if not agree.any():
        raise DegenerateDataError(
            f"the models pick the same option on none of the {int(pair.usable.sum())} usable "
            "items: nothing to fit the temperature on")
    z = pair.aligned[agree]
    # The target: the base's option distribution at T = 1 (0 where an option is absent). An
    # option the aligned model has no finite logprob for is absent at every T: its term does not
    # depend on T (DACA's clamp makes it a constant), so it is left out.
    weight = np.where(np.isfinite(pair.aligned_lp[agree]), np.exp(pair.base_lp[agree]), 0.0)
    used = weight > 0.0

    def objective(log_t: float) -> float:
        lq = _option_log_probs(z, pair.groups, pair.k, math.exp(log_t))
        terms = np.where(used, weight * np.where(used, lq, 0.0), 0.0)
        return float(-np.mean(terms.sum(axis=1)))

    t = TemperatureScaling._best(objective)
    return DacaFit(temperature=t, n=int(agree.size), n_agree=int(agree.sum()),
                   n_usable=int(pair.usable.sum()))


def fit_daca_temperature(
    aligned_logits: ArrayLike,
    base_logits: ArrayLike,
    groups: ArrayLike | None = None,
    *,
    base_groups: ArrayLike | None = None,
) -> float:
    """The temperature of `fit_daca` (agreeing items only)."""
    return fit_daca(aligned_logits, base_logits, groups, base_groups=base_groups).temperature
