"""The in-memory sweep and the writer: parents reproduced exactly, written == in memory, resume."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import calibserve.merge.writer as writer
from calibserve.merge.checkpoint import PairPlan, open_checkpoint, plan_pair
from calibserve.merge.evaluate import Scores
from calibserve.merge.freeform import FreeFormScores, free_form_metrics
from calibserve.merge.model import load_eval_model
from calibserve.merge.sweep import Evaluation, ResultCache, refine_lambdas, run_sweep


def _plan(base: Path, aligned: Path) -> PairPlan:
    return plan_pair(
        open_checkpoint(str(base), "--base"), open_checkpoint(str(aligned), "--aligned")
    )


def _written(dest: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(dest.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_lambda_0_and_1_reproduce_the_parents_exactly(
    tiny_world: dict[str, Path], method: str
) -> None:
    plan = _plan(tiny_world["base"], tiny_world["aligned"])
    em = load_eval_model(plan, method, torch.float32, "cpu")  # type: ignore[arg-type]
    ids = torch.tensor([[3, 20, 21, 22, 9, 10]])
    for lam, name in ((0.0, "base"), (1.0, "aligned")):
        parent = AutoModelForCausalLM.from_pretrained(tiny_world[name], dtype=torch.float32).eval()
        em.set(0.37)  # move away first: set() must overwrite everything
        em.set(lam)
        live = em.model.state_dict()
        for k, v in parent.state_dict().items():
            assert torch.equal(live[k], v), (lam, k)
        with torch.no_grad():
            assert torch.equal(em.model(ids).logits, parent(ids).logits)


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_written_checkpoint_equals_the_in_memory_model(
    tiny_world: dict[str, Path], tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tiny_world["base"], tiny_world["aligned"])
    em = load_eval_model(plan, method, torch.float32, "cpu")  # type: ignore[arg-type]
    lam = 0.3
    em.set(lam)
    # Tiny chunks and shards: exercise row chunking and the sharded index.
    monkeypatch.setattr(writer, "CHUNK_BYTES", 4096)
    dest = tmp_path / "model"
    files = writer.write_model(
        plan,
        lam,
        method,
        dest,
        shard_size=200_000,  # type: ignore[arg-type]
        model_card="# card\n",
    )
    assert len(files) > 1 and (dest / "model.safetensors.index.json").is_file()
    written = _written(dest)
    live = em.model.state_dict()
    assert set(written) == {t.name for t in plan.tensors}
    for k, v in written.items():
        if method == "linear":
            assert torch.equal(v, live[k]), k
        else:
            torch.testing.assert_close(v, live[k], rtol=1e-6, atol=1e-7)
    # And it loads in transformers (tokenizer and chat template too) to the same logits.
    loaded = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    ids = torch.tensor([[3, 20, 21, 22, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, em.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert (dest / "tokenizer.json").is_file() and (dest / "README.md").is_file()


def test_grown_vocabulary_rows_come_from_the_aligned_model(
    pair_factory: Callable[..., tuple[Path, Path]], tmp_path: Path
) -> None:
    base, aligned = pair_factory(grow=3)
    plan = _plan(base, aligned)
    dest = tmp_path / "m"
    writer.write_model(plan, 0.4, "linear", dest, 10**9, "card")
    out = _written(dest)
    b, a = load_file(str(base / "model.safetensors")), load_file(str(aligned / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        n = b[name].shape[0]
        assert out[name].shape == a[name].shape
        assert torch.equal(out[name][n:], a[name][n:])
        assert torch.equal(out[name][:n], torch.lerp(b[name], a[name][:n], 0.4))
    em = load_eval_model(plan, "linear", torch.float32, "cpu")
    em.set(0.4)
    assert torch.equal(em.model.state_dict()["lm_head.weight"], out["lm_head.weight"])


def test_float16_parents_are_written_in_float16(
    pair_factory: Callable[..., tuple[Path, Path]], tmp_path: Path
) -> None:
    base, aligned = pair_factory(dtype=torch.float16)
    plan = _plan(base, aligned)
    writer.write_model(plan, 0.5, "linear", tmp_path / "m", 10**9, "card")
    out = _written(tmp_path / "m")
    b, a = load_file(str(base / "model.safetensors")), load_file(str(aligned / "model.safetensors"))
    for k, v in out.items():
        assert v.dtype == torch.float16
        expect = torch.lerp(b[k].float(), a[k].float(), 0.5).half()  # computed in float32
        assert torch.equal(v, expect), k


def _fake_eval(calls: list[float], fail_at: int | None = None) -> Callable[..., Evaluation]:
    def evaluate(lam: float) -> Evaluation:
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # what a Ctrl-C (or the end of a kill) looks like mid-sweep
        calls.append(lam)
        conf = np.full(4, 0.5 + lam / 4)
        scores = Scores(conf, np.array([True, False, True, lam > 0.5]), np.zeros(4, np.int64))
        short = FreeFormScores(np.full(3, 0.3 + lam / 2), np.array([lam > 0.2, False, True]),
                               [f"reply {lam}", "", "x"], np.array([2, 16, 1]))
        return Evaluation({"accuracy": float(scores.correct.mean()), "ece": lam / 10}, scores,
                          None, free_form_metrics(short), short)

    return evaluate


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path: Path) -> None:
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    first: list[float] = []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid, _fake_eval(first, fail_at=3), ResultCache(tmp_path, "k"))
    assert first == [0.0, 0.25, 0.5]
    second: list[float] = []
    points = run_sweep(grid, _fake_eval(second), ResultCache(tmp_path, "k"))
    assert second == [0.75, 1.0]  # only what was missing
    assert [p.cached for p in points] == [True, True, True, False, False]
    fresh = run_sweep(grid, _fake_eval([]), ResultCache(tmp_path / "fresh", "k"))
    for p, q in zip(points, fresh, strict=True):
        assert p.metrics == q.metrics and np.array_equal(p.scores.confidence, q.scores.confidence)
        # The short answers are cached with their point (an undefined AUROC stays NaN).
        assert p.free_form is not None and q.free_form is not None
        assert p.free_form.replies == q.free_form.replies
        assert np.array_equal(p.free_form.confidence, q.free_form.confidence)
        assert p.free_form_metrics is not None and q.free_form_metrics is not None
        assert p.free_form_metrics.keys() == q.free_form_metrics.keys()
        assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in
                   zip(p.free_form_metrics.values(), q.free_form_metrics.values(), strict=True))
    # Another fingerprint (other data, method, parents) shares nothing.
    other: list[float] = []
    run_sweep(grid[:2], _fake_eval(other), ResultCache(tmp_path, "other"))
    assert other == grid[:2]


def test_refinement_adds_midpoints_around_the_frontier() -> None:
    grid = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0]
    assert refine_lambdas(grid, [0.3]) == [0.25, 0.35]
    assert refine_lambdas(grid, [0.5]) == [0.45, 0.75]
    assert refine_lambdas([0.0, 0.02, 1.0], [0.0]) == []  # already fine enough


@pytest.mark.parametrize("tie_base", [True, False])
def test_tied_parents_round_trip(
    pair_factory: Callable[..., tuple[Path, Path]], tmp_path: Path, tie_base: bool
) -> None:
    base, _ = pair_factory(tie=tie_base)
    _, aligned = pair_factory(tie=True)
    plan = _plan(base, aligned)
    assert plan.tied == tie_base  # both tied: stays tied; one untied: written untied
    em = load_eval_model(plan, "linear", torch.float32, "cpu")
    em.set(0.6)
    dest = tmp_path / "m"
    writer.write_model(plan, 0.6, "linear", dest, 10**9, "card")
    assert ("lm_head.weight" in _written(dest)) == (not tie_base)
    loaded = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    ids = torch.tensor([[3, 20, 21, 22, 9, 10]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, em.model(ids).logits)
