"""Evaluate a causal LM on multiple-choice items the way the server will score it.

Each item is asked as one user message (`format_mc_prompt`) under the aligned model's chat
template; the next-token distribution is read at the end of the generation prompt, and the
logprobs of every token that names an option letter go through `calibration.answer_confidence`,
the same function the server applies to vLLM's `top_logprobs`. Prediction = the most likely
option; confidence = its probability renormalised over the options.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from calibserve.calibration import (
    N_BINS,
    NoOptionTokensError,
    OptionLogits,
    accuracy,
    answer_confidence,
    brier,
    ece,
    mean_confidence,
    nll,
    normalize_token,
)
from calibserve.calibration.mc_prompt import LETTERS, format_mc_prompt
from calibserve.merge.errors import InvalidData

__all__ = [
    "LETTERS",
    "format_mc_prompt",
    "load_items",
    "load_mc_items",
    "load_short_answers",
    "short_answer_split",
    "SHORT_ANSWER_FILES",
    "Scores",
    "MCEvaluator",
    "point_metrics",
    "option_token_map",
]


def _is_mc(item: Mapping[str, Any]) -> bool:
    return "choices" in item


def _check_item(item: Any, where: str) -> None:
    if not isinstance(item, Mapping) or not isinstance(item.get("question"), str):
        raise InvalidData(f"{where}: an item needs a string 'question'", "--data")
    if _is_mc(item):
        choices = item["choices"]
        ok = (
            isinstance(choices, list)
            and 2 <= len(choices) <= len(LETTERS)
            and all(isinstance(c, str) for c in choices)
        )
        if not ok:
            raise InvalidData(f"{where}: 'choices' must be 2 to 8 strings", "--data")
        ans = item.get("answer")
        if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
            raise InvalidData(f"{where}: 'answer' must be the index of the right choice", "--data")
        if "prompt" in item and not isinstance(item["prompt"], str):
            raise InvalidData(f"{where}: 'prompt' must be a string (the user message)", "--data")
    elif not isinstance(item.get("answer"), str):
        raise InvalidData(f"{where}: a short-answer item needs a string 'answer'", "--data")


def _checked_items(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """Each item of a JSONL file, checked (`_check_item`), with where it is (`FILE line N`)."""
    if not path.is_file():
        raise InvalidData(f"{path} does not exist", "--data")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidData(f"{where}: not JSON ({exc.msg})", "--data") from exc
            _check_item(item, where)
            yield item, where


def load_items(path: Path, limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Multiple-choice items of a JSONL split, and how many short-answer items were skipped."""
    items: list[dict[str, Any]] = []
    skipped = 0
    for item, _ in _checked_items(path):
        if _is_mc(item):
            items.append(item)
        else:
            skipped += 1  # short-answer items have no option distribution to score
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise InvalidData(f"{path} has no multiple-choice items", "--data")
    return items, skipped


def load_mc_items(path: Path) -> list[dict[str, Any]]:
    """Every multiple-choice item of a JSONL split; none when the file does not exist."""
    if not Path(path).is_file():
        return []
    return [item for item, _ in _checked_items(Path(path)) if _is_mc(item)]


def load_short_answers(path: Path) -> list[dict[str, Any]]:
    """Short-answer items (`{"question", "answer": str, "aliases"?: [str]}`) of a JSONL file;
    multiple-choice items in it are skipped (they are `load_items`' business). Extra keys stay."""
    items: list[dict[str, Any]] = []
    for item, where in _checked_items(path):
        if _is_mc(item):
            continue
        aliases = item.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise InvalidData(f"{where}: 'aliases' must be a list of strings", "--data")
        items.append(item)
    return items


# Where a data directory's short-answer items are: their own files, and any short-answer items
# mixed into the multiple-choice split of the same name (recognised by their shape).
SHORT_ANSWER_FILES: dict[str, tuple[str, ...]] = {
    "select": ("short_select.jsonl", "select.jsonl"),
    "calibrate": ("short_calibrate.jsonl", "calibrate.jsonl"),
    "test": ("short_test.jsonl", "test.jsonl"),
}


def short_answer_split(data_dir: Path, split: str) -> list[dict[str, Any]]:
    """Every short-answer item of `split` (`select`, `calibrate` or `test`) in `data_dir` (may
    be none)."""
    items: list[dict[str, Any]] = []
    for name in SHORT_ANSWER_FILES[split]:
        if (Path(data_dir) / name).is_file():
            items += load_short_answers(Path(data_dir) / name)
    return items


@dataclass(frozen=True, slots=True)
class Scores:
    """Per-item results of one evaluation."""

    confidence: NDArray[np.float64]
    correct: NDArray[np.bool_]
    prediction: NDArray[np.int64]
    # Probability that the predicted choice is right, when items carry the true distribution
    # (`p_true`): a lower-variance accuracy than one sampled gold answer per question.
    expected: NDArray[np.float64] | None = None
    # What the multi-class option temperature is fitted on (None: not recorded, e.g. a sweep
    # cache written before it was): the option-letter token logprobs and each item's gold option.
    options: OptionLogits | None = None

    def to_dict(self) -> dict[str, Any]:
        opts = self.options
        return {
            "confidence": self.confidence.tolist(),
            "correct": self.correct.astype(int).tolist(),
            "prediction": self.prediction.tolist(),
            "expected": None if self.expected is None else self.expected.tolist(),
            "options": None if opts is None else {
                # JSON has no -inf: absent tokens are written as the vLLM floor, -9999.
                "logits": np.maximum(opts.logits, -9999.0).tolist(),
                "groups": opts.groups.tolist(),
                "gold": opts.gold.tolist(),
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scores:
        exp = d.get("expected")
        pred = np.asarray(d["prediction"], np.int64)
        o = d.get("options")
        opts = None if o is None else OptionLogits(
            np.asarray(o["logits"], np.float64), np.asarray(o["groups"], np.intp),
            pred.astype(np.intp), np.asarray(o["gold"], np.intp))
        return cls(
            np.asarray(d["confidence"], np.float64),
            np.asarray(d["correct"], bool),
            pred,
            None if exp is None else np.asarray(exp, np.float64),
            opts,
        )

    def served(self, confidence: NDArray[np.float64]) -> Scores:
        """The same answers with another confidence (e.g. the calibrated one)."""
        return Scores(confidence, self.correct, self.prediction, self.expected, self.options)


def point_metrics(scores: Scores, n_bins: int = N_BINS) -> dict[str, float]:
    """Accuracy, ECE, Brier, NLL and mean confidence via calibration/ (binary, on confidence)."""
    c, y = scores.confidence, scores.correct
    out = {
        "accuracy": accuracy(y),
        "ece": ece(c, y, n_bins),
        "brier": brier(c, y),
        "nll": nll(c, y),
        "mean_confidence": mean_confidence(c),
        "n": int(c.size),
    }
    if scores.expected is not None:
        out["expected_accuracy"] = float(np.mean(scores.expected))
        # ECE against the expected correctness: confidence 0.7 on a 70% fact is calibrated.
        out["expected_ece"] = ece(c, scores.expected, n_bins)
    return out


def option_token_map(tokenizer: Any, letters: Sequence[str] = LETTERS) -> dict[str, list[int]]:
    """Every vocabulary id whose token names a letter (`A`, `▁A`, `ĠA`, ...), per letter.

    The server sees these as separate `top_logprobs` entries and `answer_confidence` adds them
    up per option, so offline scoring must include all of them too.
    """
    wanted = set(letters)
    found: dict[str, list[int]] = {letter: [] for letter in letters}
    for token, idx in tokenizer.get_vocab().items():
        label = normalize_token(token)
        if label in wanted:
            found[label].append(int(idx))
    for ids in found.values():
        ids.sort()
    return found


class MCEvaluator:
    """Tokenizes a split once, then scores any model state on it in batches."""

    def __init__(
        self,
        tokenizer: Any,
        items: Sequence[Mapping[str, Any]],
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.items = list(items)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        n_letters = max(len(it["choices"]) for it in self.items)
        letters = LETTERS[:n_letters]
        token_map = option_token_map(tokenizer, letters)
        missing = [k for k, v in token_map.items() if not v]
        if missing:
            raise InvalidData(
                f"the aligned tokenizer has no token for option letter(s) {', '.join(missing)}",
                "--aligned",
            )
        self.letter_ids = token_map
        self.columns = [i for ls in letters for i in token_map[ls]]
        self.column_tokens = [tokenizer.convert_ids_to_tokens(i) for i in self.columns]
        self.prompts: list[list[int]] = []
        for item in self.items:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": format_mc_prompt(item)}],
                add_generation_prompt=True,
                tokenize=False,
            )
            # vLLM's chat endpoint tokenizes the rendered template without adding specials.
            self.prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        # Longest first: similar lengths batch together, and memory peaks in the first batch.
        self.order = sorted(range(len(self.prompts)), key=lambda i: -len(self.prompts[i]))

    @torch.inference_mode()
    def letter_logprobs(self, model: torch.nn.Module, top_k: int | None = None
                        ) -> NDArray[np.float64]:
        """(n_items, n_columns) full-vocabulary logprobs of the option-letter tokens. With
        `top_k`, as the server reads them: a letter token outside the first token's `top_k`
        alternatives (the `answer` method asks for 5) is absent (-inf), and the options
        renormalise without it; an item with no letter among them keeps every letter's (the
        server scores such a reply by another method, as the vLLM evaluator does)."""
        out = np.zeros((len(self.prompts), len(self.columns)), np.float64)
        cols = torch.tensor(self.columns, device=self.device)
        for start in range(0, len(self.order), self.batch_size):
            idx = self.order[start : start + self.batch_size]
            seqs = [self.prompts[i] for i in idx]
            width = max(len(s) for s in seqs)
            # Left padding puts every prompt's last token in the last column, so only one
            # position's logits are computed; explicit position ids keep the math unpadded.
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, width - len(s) :] = torch.tensor(s)
                mask[r, width - len(s) :] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self._last_logits(model, ids, mask, pos)
            full = torch.log_softmax(logits.float(), dim=-1)
            lp = full[:, cols]
            if top_k is not None:
                inside = lp >= full.topk(top_k, dim=-1).values[:, -1:]
                lp = torch.where(inside | ~inside.any(dim=-1, keepdim=True), lp, -torch.inf)
            out[idx] = lp.double().cpu().numpy()
        return out

    def _last_logits(
        self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        kwargs = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": pos.to(self.device),
            "use_cache": False,
        }
        try:
            # Only the last position's logits: a vocabulary-sized row per prompt, not per token.
            logits: torch.Tensor = model(**kwargs, logits_to_keep=1).logits[:, -1, :]
        except TypeError:  # a model class without `logits_to_keep`
            logits = model(**kwargs).logits[:, -1, :]
        return logits

    def score(self, model: torch.nn.Module) -> Scores:
        """Prediction and answer confidence of every item for the model's current weights."""
        return self.score_logprobs(self.letter_logprobs(model))

    def score_logprobs(self, lps: NDArray[np.float64]) -> Scores:
        """Scores from the (n_items, n_columns) logprobs of the option-letter tokens
        (`columns`), whichever engine computed them (the vLLM evaluator reads them from the
        engine's first-token logprobs and scores them here, so both evaluators agree)."""
        conf = np.zeros(len(self.items))
        pred = np.zeros(len(self.items), np.int64)
        lettered = np.ones(len(self.items), bool)
        for i, item in enumerate(self.items):
            options = LETTERS[: len(item["choices"])]
            top = dict(zip(self.column_tokens, lps[i].tolist(), strict=True))
            pred[i] = self._argmax_option(top, options)
            try:
                conf[i] = answer_confidence(top, options[pred[i]], options)
            except NoOptionTokensError:
                # No option letter among the served alternatives (the vLLM evaluator reads what
                # the server reads): no option was answered, so it is not right.
                lettered[i] = False
        gold = np.asarray([it["answer"] for it in self.items], np.intp)
        correct = (pred == gold) & lettered
        return Scores(conf, correct, pred, self._expected(pred), self._options(lps, pred, gold))

    def _options(
        self, lps: NDArray[np.float64], pred: NDArray[np.int64], gold: NDArray[np.intp]
    ) -> OptionLogits:
        groups = np.asarray([LETTERS.index(normalize_token(t)) for t in self.column_tokens],
                            np.intp)
        n_choices = np.asarray([len(it["choices"]) for it in self.items])
        # An item with fewer choices has no options beyond its own: absent, as in serving.
        logits = np.where(groups[None, :] < n_choices[:, None], lps, -np.inf)
        return OptionLogits(logits, groups, pred.astype(np.intp), gold)

    def _expected(self, pred: NDArray[np.int64]) -> NDArray[np.float64] | None:
        probs = [it.get("p_true") for it in self.items]
        ok = all(
            isinstance(p, list) and len(p) == len(it["choices"])
            for p, it in zip(probs, self.items, strict=True)
        )
        if not ok:
            return None
        return np.asarray([float(p[k]) for p, k in zip(probs, pred, strict=True)])  # type: ignore[index]

    @staticmethod
    def _argmax_option(top: Mapping[str, float], options: Sequence[str]) -> int:
        mass = {o: -np.inf for o in options}
        for tok, lp in top.items():
            label = normalize_token(tok)
            if label in mass:
                mass[label] = float(np.logaddexp(mass[label], lp))
        # Ties go to the earlier option, as in answer_confidence(chosen=None).
        return max(range(len(options)), key=lambda k: (mass[options[k]], -k))
