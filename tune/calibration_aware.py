"""Calibration-aware fine-tuning (seed 004): the CFT and RCFT objectives of Xiao et al.

Source: J. Xiao, B. Hou, Z. Wang, R. Jin, Q. Long, W. J. Su, L. Shen, "Restoring Calibration for
Aligned Large Language Models: A Calibration-Aware Fine-Tuning Approach", ICML 2025 (PMLR 267),
arXiv 2505.01997; released code github.com/ZhanliangAaronWang/RestoreLLMCalibration (read at
commit 0461f80: `train/Custom_Trainer.py`, `train/trainer.py`, `utils/reward_max_conf.py`,
`utils/confidence_max_nb.py`, `utils/not_max_target_confidence_new.py`,
`utils/group_dividing.py`, `utils/accuracy_bin_all_sample_max.py`).

The setting is multiple choice: the model's confidence is the softmax, over the K option-letter
tokens only, of the logits of the first reply token (`OptionView`); its prediction is the top
option, right when it is the gold.

Modes
-----
- ``"cft"``, calibration-aware fine-tuning (the paper's remedy in the calibratable regime):
  supervised fine-tuning on domain multiple-choice data with the loss on the answer only
  (L_SFT1 = -log p(answer | question)). It has no calibration term: the total loss is the SFT loss
  the trainer computed, and the E step is not needed (`needs_bins("cft")` is False).
- ``"rcft"``, regularised CFT (the non-calibratable regime: training that also raises accuracy):
  the SFT loss plus the EM-style ECE regulariser, weighted as the released code does::

      L = (1 - alpha) * L_SFT + alpha * CALIBRATION_LOSS_SCALE * L_cal

The regulariser (E step, then M step)
-------------------------------------
E step (`BinAccuracy.estimate`, model frozen, no gradient): over the training items, bin each
item by its top option's probability into n = 10 equal-width bins (bin k holds [k/n, (k+1)/n),
1.0 in the last bin) and record per bin the count N_k and the accuracy a_k = correct_k / N_k.

M step (`calibration_loss`, differentiated): for each item i of the batch, with option
probabilities p_i, top option probability p_top, bin k = bin(p_top) *under the current model*,
and the m_i non-top options present (m = 3 for four options)::

    q_i     = max over non-top j of p_ij                  (the second-largest probability)
    g_ij    = tanh( ln(3) / (1 - a_k) * p_ij / q_i )      (non-top j)
    t_ij    = (1 - a_k) * (1 + g_ij) / (m_i + sum_j g_ij) (non-top targets; they sum to 1 - a_k)
    l_i     = (p_top - a_k)^2 + sum over non-top j of (p_ij - t_ij)^2
    L_cal   = sum over bins k of (1 / N_k) * sum over batch items i in bin k of l_i

so the top option is pulled toward its bin's accuracy and the remaining 1 - a_k is spread over
the other options in their present order (tanh is increasing: a rank-preserving target). If
a_k = 1 the non-top targets are 0. Bins that were empty at the E step (N_k = 0) contribute
nothing (there is no accuracy to aim at). `a_k`, `N_k` and, by default, the non-top targets
`t_ij` are constants of the M step (detached); gradients flow through `p_top` and `p_ij` only.

Paper versus released code (which this module follows, and why)
----------------------------------------------------------------
The paper's body could only be read here through its abstract, the OpenReview page and reviews,
and secondary summaries; the loss details below are the code's, which is the runnable definition.
1. Modes. The paper defines CFT (L_SFT1, answer-only loss, no regulariser) and RCFT (L_SFT2, the
   loss over question and answer tokens, plus the ECE regulariser). The code has one trainer: an
   answer-only SFT loss (trl's completion-only collator) plus alpha * 1e-3 * L_cal; its sweep runs
   alpha in {0.0, 1.0}. We follow the paper for what each mode contains and the code for the form
   of the regulariser. RCFT's SFT loss is whatever the trainer passes: answer-only by default (the
   code's choice, and calibserve's trainer computes logits only on the reply, which is what keeps
   a 262k-token output head affordable on a CPU); the paper's L_SFT2 is the trainer's option.
2. Scale and weights. The 1e-3 factor and the (1 - alpha) weight on SFT are the code's
   (`Custom_Trainer.compute_loss`); the paper, as far as it could be read, adds the regulariser
   to the SFT loss with one weight. With Adam the loss's overall scale matters only relative to
   the SFT term; 1 / N_k with N_k counted over the whole E-step set makes L_cal per batch about
   batch / N_k of a bin's mean squared error, so alpha * 1e-3 * L_cal is small next to L_SFT
   unless alpha is near 1 (the code's sweep: alpha in {0.0, 1.0}).
3. Top bin. The code's loop runs `range(len(upper_boundary) - 1)` over 10 bin edges, so its last
   bin, [0.9, 1.0], is never regularised (an off-by-one after `get_adaptive_bins` replaced an
   11-edge linspace). That is the bin where an aligned model's overconfidence sits; we regularise
   every bin (``regularise_top_bin=False`` reproduces the code).
4. Empty bins. The code sets an empty bin's accuracy to 0 (`nan_to_num`) and then divides by its
   count of 0 when a batch item lands there (an infinite loss); we skip those items.
5. Non-top targets. The code computes them from the live probabilities without detaching, so its
   gradient also flows through t_ij. t_ij depends on the logits only through p_ij / q_i, i.e. on
   differences between non-top logits: that extra gradient reshapes the non-top options toward
   a target that moves with them and leaves the top logit's gradient unchanged (measured: on a
   saturated item it stays ~2e-4 while the top logit's is ~1e-6). The EM reading (and the code's
   own comment on detaching the E step's logits "to let the confidence move towards the fixed
   accuracy") holds the targets fixed in the M step, so we detach them by default;
   ``detach_targets=False`` reproduces the code's gradient. The loss value is the same.
6. Option count. The code hard-codes four options (`ln(3)`, `T + 3`, letters A-D). We keep the
   constant ln(3) (`TARGET_GAMMA_NUMERATOR`) and use each item's own number of present non-top
   options m_i in the denominator, so the targets sum to 1 - a_k for any K; for K = 4 this is
   the code's formula exactly. Padded options (-inf logits) get probability 0 and no term.
7. E step frequency. The code estimates bin accuracies once, before training. EM alternates:
   `BinAccuracy.estimate` can be called again (per epoch, say) by the trainer.
8. Precision. The code bins the model's own (bf16) probabilities and sums squares in float64; we
   compute option probabilities in float32 whatever the logits' dtype.
9. Sparse bins (ours). ``min_count`` (default 1: the code's behaviour) skips bins that held fewer
   E-step items; a bin of one item has accuracy 0 or 1 and a weight of 1 / 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CALIBRATION_LOSS_SCALE",
    "DEFAULT_ALPHA",
    "MODES",
    "N_BINS",
    "TARGET_GAMMA_NUMERATOR",
    "BinAccuracy",
    "OptionView",
    "bin_index",
    "calibration_aware_loss",
    "calibration_loss",
    "needs_bins",
    "non_top_targets",
    "option_view",
]

MODES: tuple[str, ...] = ("cft", "rcft")

# The paper's and the code's binning (trainer.py `--num_bins` default 10). calibserve's own
# metrics use N_BINS = 15 (calibration.metrics); this is the method's, not the product's, binning.
N_BINS = 10

# train/Custom_Trainer.py, compute_loss: `(1 - self.alpha) * sft_loss + self.alpha *
# calibration_loss * (1e-3)`. A constant of the released code; the paper does not state it.
CALIBRATION_LOSS_SCALE = 1e-3

# train/trainer.py `--alpha` default. (The released sweep, scripts/submit_training.sh, runs 0.0 and
# 1.0.)
DEFAULT_ALPHA = 0.5

# utils/not_max_target_confidence_new.py: `constant = torch.log(torch.ones(n) * 3)`, the
# numerator of the tanh slope, chosen there for four options (3 non-top ones).
TARGET_GAMMA_NUMERATOR = math.log(3.0)


@dataclass(frozen=True)
class OptionView:
    """The first reply token's logits restricted to the K option letters, and the gold option.

    `logits` is [B, K]; an option a row does not have is -inf (`option_view` builds that).
    `gold` is [B] long, an index into K that must name a present option.
    """

    logits: Tensor
    gold: Tensor

    def __post_init__(self) -> None:
        if self.logits.dim() != 2 or self.logits.shape[1] < 1:
            raise ValueError(f"logits must be [B, K] with K >= 1, got {tuple(self.logits.shape)}")
        if self.gold.dim() != 1 or self.gold.shape[0] != self.logits.shape[0]:
            raise ValueError(
                f"gold must be [B] with B = {self.logits.shape[0]}, got {tuple(self.gold.shape)}"
            )
        if self.gold.dtype != torch.long:
            raise ValueError(f"gold must be torch.long, got {self.gold.dtype}")
        if self.logits.shape[0] == 0:
            return
        values = self.logits.detach()
        if bool(torch.isnan(values).any()) or bool((values == math.inf).any()):
            raise ValueError("option logits must be finite or -inf (absent option)")
        present = self.present
        if not bool(present.any(dim=1).all()):
            raise ValueError("every row needs at least one present option")
        k = self.logits.shape[1]
        if bool(((self.gold < 0) | (self.gold >= k)).any()):
            raise ValueError(f"gold indices must lie in [0, {k})")
        if not bool(present.gather(1, self.gold.unsqueeze(1)).all()):
            raise ValueError("gold names an absent option")

    @property
    def present(self) -> Tensor:
        """[B, K] bool: the options each row has."""
        return self.logits.detach() != -math.inf

    def probabilities(self) -> Tensor:
        """[B, K] float32 softmax over the present options (absent options get exactly 0)."""
        return torch.softmax(self.logits.float(), dim=-1)


def option_view(reply_first_logits: Tensor, option_token_ids: Tensor, gold: Tensor) -> OptionView:
    """Restrict the first reply token's logits [B, V] to each row's option-letter tokens.

    `option_token_ids` is [B, K] long with -1 for an option a row does not have (fewer choices),
    or [K] when every row has the same options. Gradients flow to the gathered logits only.
    """
    if reply_first_logits.dim() != 2:
        shape = tuple(reply_first_logits.shape)
        raise ValueError(f"reply_first_logits must be [B, V], got {shape}")
    batch, vocab = reply_first_logits.shape
    ids = option_token_ids
    if ids.dim() == 1:
        ids = ids.unsqueeze(0).expand(batch, -1)
    if ids.dim() != 2 or ids.shape[0] != batch:
        raise ValueError(f"option_token_ids must be [B, K] or [K], got {tuple(ids.shape)}")
    if ids.dtype != torch.long:
        raise ValueError(f"option_token_ids must be torch.long, got {ids.dtype}")
    ids = ids.to(reply_first_logits.device)
    absent = ids < 0
    if bool((ids < -1).any()) or bool((ids >= vocab).any()):
        raise ValueError(f"option token ids must be -1 (absent) or in [0, {vocab})")
    if ids.shape[1] > 1:
        ordered = ids.sort(dim=1).values
        if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
            raise ValueError("two options of a row share a token id")
    gathered = reply_first_logits.gather(1, ids.clamp(min=0))
    logits = gathered.masked_fill(absent, -math.inf)
    return OptionView(logits=logits, gold=gold.to(device=reply_first_logits.device))


def bin_index(confidence: Tensor, n_bins: int = N_BINS) -> Tensor:
    """Bin of each confidence: [k/n, (k+1)/n), 1.0 in the last bin (the code's bucketize)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    # utils/group_dividing.py: np.linspace(0, 1, n, endpoint=False), i.e. k * (1 / n) in float64,
    # with torch.bucketize(..., right=True): the left edge belongs to the bin.
    # Done on the CPU in float64 (some accelerators have no float64); B numbers, no cost.
    edges = torch.arange(n_bins, dtype=torch.float64) * (1.0 / n_bins)
    conf = confidence.detach().to(device="cpu", dtype=torch.float64)
    index = torch.bucketize(conf, edges, right=True) - 1
    return index.clamp(min=0, max=n_bins - 1).to(confidence.device)


@dataclass(frozen=True)
class BinAccuracy:
    """Per-bin statistics of the top option at the E step: counts, corrects, confidence sums.

    Tensors are [n_bins] float64 on the CPU. An empty bin has accuracy 0 (the code's
    `nan_to_num`) and `populated` False; the calibration loss skips it.
    """

    counts: Tensor
    corrects: Tensor
    confidence_sums: Tensor

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape) for t in (self.counts, self.corrects, self.confidence_sums)}
        if len(shapes) != 1 or self.counts.dim() != 1 or self.counts.shape[0] < 1:
            raise ValueError("counts, corrects and confidence_sums must be equal-length [n_bins]")
        if bool((self.corrects > self.counts).any()) or bool((self.corrects < 0).any()):
            raise ValueError("corrects must lie in [0, counts] in every bin")

    @property
    def n_bins(self) -> int:
        return int(self.counts.shape[0])

    @property
    def total(self) -> int:
        return int(self.counts.sum().item())

    @property
    def populated(self) -> Tensor:
        """[n_bins] bool: bins that held at least one item at the E step."""
        return self.counts > 0

    @property
    def accuracy(self) -> Tensor:
        """[n_bins] float64: correct / count, 0 for an empty bin."""
        return torch.where(self.populated, self.corrects / self.counts.clamp(min=1.0), 0.0)

    @property
    def mean_confidence(self) -> Tensor:
        """[n_bins] float64: mean top-option probability per bin, 0 for an empty bin."""
        return torch.where(self.populated, self.confidence_sums / self.counts.clamp(min=1.0), 0.0)

    def ece(self) -> float:
        """Top-label ECE of the E step (inference/ece_evaluator.py): sum_k N_k/N |a_k - c_k|."""
        if self.total == 0:
            return 0.0
        gap = (self.accuracy - self.mean_confidence).abs()
        return float((self.counts / self.counts.sum() * gap).sum().item())

    def to_dict(self) -> dict[str, list[float] | float | int]:
        """JSON-ready summary, for a run's train_info.json."""
        return {
            "n_bins": self.n_bins,
            "counts": [float(v) for v in self.counts.tolist()],
            "accuracy": [float(v) for v in self.accuracy.tolist()],
            "mean_confidence": [float(v) for v in self.mean_confidence.tolist()],
            "ece": self.ece(),
        }

    @classmethod
    def from_confidences(
        cls, confidence: Tensor, correct: Tensor, n_bins: int = N_BINS
    ) -> BinAccuracy:
        """Bin top-option confidences [N] with their correctness [N] (bool or 0/1)."""
        if confidence.dim() != 1 or correct.shape != confidence.shape:
            raise ValueError("confidence and correct must be equal-length 1-D tensors")
        conf = confidence.detach().to(device="cpu", dtype=torch.float64)
        if bool(((conf < 0) | (conf > 1) | torch.isnan(conf)).any()):
            raise ValueError("confidences must lie in [0, 1]")
        right = correct.detach().to(device="cpu", dtype=torch.float64)
        index = bin_index(conf, n_bins)
        counts = torch.bincount(index, minlength=n_bins).to(torch.float64)
        corrects = torch.bincount(index, weights=right, minlength=n_bins).to(torch.float64)
        sums = torch.bincount(index, weights=conf, minlength=n_bins).to(torch.float64)
        return cls(counts=counts, corrects=corrects, confidence_sums=sums)

    @classmethod
    def estimate(cls, views: Iterable[OptionView], n_bins: int = N_BINS) -> BinAccuracy:
        """The E step: per-bin accuracy of the top option over `views` (the training items).

        Run it with the model frozen (eval mode); iteration happens under `torch.no_grad()`, so a
        generator that runs the forward pass lazily is covered too. An item is correct when its
        top option (the first, on ties) is the gold.
        """
        counts = torch.zeros(n_bins, dtype=torch.float64)
        corrects = torch.zeros(n_bins, dtype=torch.float64)
        sums = torch.zeros(n_bins, dtype=torch.float64)
        with torch.no_grad():
            for view in views:
                if view.logits.shape[0] == 0:
                    continue
                probs = view.probabilities()
                top, predicted = probs.max(dim=-1)
                part = cls.from_confidences(top, predicted == view.gold, n_bins)
                counts += part.counts
                corrects += part.corrects
                sums += part.confidence_sums
        return cls(counts=counts, corrects=corrects, confidence_sums=sums)


def needs_bins(mode: str) -> bool:
    """Whether a mode's loss uses the E step's `BinAccuracy` (only RCFT's regulariser does)."""
    _check_mode(mode)
    return mode == "rcft"


def non_top_targets(probs: Tensor, non_top: Tensor, accuracy: Tensor) -> Tensor:
    """Targets for the non-top options (utils/not_max_target_confidence_new.py, any K).

    `probs` [B, K], `non_top` [B, K] bool (present and not the top option), `accuracy` [B] (each
    row's bin accuracy). Returns [B, K], zero outside `non_top`; each row's targets sum to
    1 - accuracy (when it has a non-top option) and keep the order of the probabilities.
    """
    acc = accuracy.to(probs.dtype).unsqueeze(1)
    miss = 1.0 - acc
    second = probs.masked_fill(~non_top, 0.0).amax(dim=1, keepdim=True)
    tiny = torch.finfo(probs.dtype).tiny
    # gamma * p = ln(3) / (1 - a) * p / q, written as a ratio in [0, 1] so that a second option
    # of probability ~0 (an overconfident row) or a = 1 gives no inf * 0.
    ratio = probs / second.clamp(min=tiny)
    slope = TARGET_GAMMA_NUMERATOR / miss.clamp(min=tiny)
    g = torch.tanh(slope * ratio).masked_fill(~non_top, 0.0)
    m = non_top.sum(dim=1, keepdim=True).to(probs.dtype)
    spread = miss / (g.sum(dim=1, keepdim=True) + m).clamp(min=1.0)
    return ((1.0 + g) * spread).masked_fill(~non_top, 0.0)


def calibration_loss(
    view: OptionView,
    bins: BinAccuracy,
    *,
    detach_targets: bool = True,
    regularise_top_bin: bool = True,
    min_count: int = 1,
) -> Tensor:
    """L_cal of the M step for one batch (float32 scalar); see the module docstring.

    A batch item counts only if its bin (under the current model) held at least `min_count`
    items at the E step; a bin of one or two items has an accuracy of 0, 0.5 or 1 and, through
    1 / N_k, a weight hundreds of times that of a full bin, so a trainer whose E step sees few
    items may want a higher floor.
    """
    probs = view.probabilities()
    if probs.shape[0] == 0:
        return probs.sum()
    present = view.present
    top_p, top_idx = probs.max(dim=-1)
    k = bin_index(top_p, bins.n_bins)
    counts = bins.counts.to(device=probs.device, dtype=probs.dtype)[k]
    accuracy = bins.accuracy.to(device=probs.device, dtype=probs.dtype)[k]
    used = counts >= max(min_count, 1)
    if not regularise_top_bin:
        used = used & (k != bins.n_bins - 1)
    columns = torch.arange(probs.shape[1], device=probs.device).unsqueeze(0)
    non_top = present & (columns != top_idx.unsqueeze(1))
    source = probs.detach() if detach_targets else probs
    targets = non_top_targets(source, non_top, accuracy)
    per_item = (top_p - accuracy) ** 2 + ((probs - targets) ** 2).masked_fill(~non_top, 0.0).sum(1)
    weight = torch.where(used, 1.0 / counts.clamp(min=1.0), 0.0)
    return (weight * per_item).sum()


def calibration_aware_loss(
    sft_loss: Tensor,
    view: OptionView,
    bins: BinAccuracy | None,
    mode: str,
    alpha: float,
    *,
    detach_targets: bool = True,
    regularise_top_bin: bool = True,
    min_count: int = 1,
) -> Tensor:
    """The total loss to backpropagate for a batch.

    - ``"cft"``: `sft_loss` itself (the paper's CFT has no calibration term; `view`, `bins` and
      `alpha` are unused, so `bins` may be None).
    - ``"rcft"``: (1 - alpha) * sft_loss + alpha * CALIBRATION_LOSS_SCALE * L_cal, with `bins`
      from `BinAccuracy.estimate`; alpha = 0 returns `sft_loss` unchanged (and needs no bins).

    The keywords go to `calibration_loss`: `detach_targets=False` and `regularise_top_bin=False`
    reproduce the released code's gradient and its unregularised top bin; `min_count` skips bins
    that held fewer items at the E step (1, the code's behaviour, skips only empty bins).
    """
    _check_mode(mode)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if mode == "cft" or alpha == 0.0:
        return sft_loss
    if bins is None:
        raise ValueError("rcft needs the E step's BinAccuracy (BinAccuracy.estimate)")
    cal = calibration_loss(
        view,
        bins,
        detach_targets=detach_targets,
        regularise_top_bin=regularise_top_bin,
        min_count=min_count,
    )
    cal = cal.to(device=sft_loss.device, dtype=sft_loss.dtype)
    return (1.0 - alpha) * sft_loss + alpha * CALIBRATION_LOSS_SCALE * cal


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
