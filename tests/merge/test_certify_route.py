"""`calibserve certify`: a route's thresholds certified tier by tier (merge/certify_route.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from calibserve.calibration import CalibrationDocument
from calibserve.calibration.guarantee import certify_threshold
from calibserve.fit.multiple_choice import calibrate_checkpoint
from calibserve.merge.certify_route import RouteTier, _served_confidence
from calibserve.merge.evaluate import load_mc_items

runner = CliRunner()


@pytest.mark.slow
def test_a_two_tier_route_is_certified_tier_by_tier(demo_dir: Path, tmp_path: Path) -> None:
    from calibserve.cli import app

    data = demo_dir / "data"
    files = {}
    for name in ("aligned", "expert"):
        files[name] = tmp_path / f"{name}.json"
        calibrate_checkpoint(demo_dir / name, data, files[name], "platt")
    before = {k: f.read_bytes() for k, f in files.items()}
    args = ["certify", "--tier", str(demo_dir / "aligned"), "--tier", str(demo_dir / "expert"),
            "--calibration", str(files["aligned"]), "--calibration", str(files["expert"]),
            "--data", str(data)]
    refused = runner.invoke(app, [*args, "--max-error", "0.02"])
    assert refused.exit_code == 2, refused.output
    assert "Invalid value for '--max-error'" in refused.output
    assert "must escalate at least" in refused.output and "Traceback" not in refused.output
    assert {k: f.read_bytes() for k, f in files.items()} == before  # nothing written

    ok = runner.invoke(app, [*args, "--max-error", "0.3", "--delta", "0.2"])
    assert ok.exit_code == 0, ok.output
    assert "tier 0 (aligned)" in ok.output and "tier 1 (expert)" in ok.output
    # The same numbers by hand: the primary on every item at delta / 2, the expert on the
    # items the primary did not keep.
    items = load_mc_items(data / "calibrate.jsonl")
    tiers = [RouteTier(demo_dir / n, files[n]) for n in ("aligned", "expert")]
    (c1, y1), (c2, y2) = (_served_confidence(t, items) for t in tiers)
    first = certify_threshold(c1, y1, 0.3, 0.1)
    primary = CalibrationDocument.load(files["aligned"]).method("answer").guarantee_for(0.3)
    assert primary is not None and primary.threshold == first.threshold
    assert (primary.tier, primary.tiers, primary.after, primary.delta) == (0, 2, None, 0.1)
    left = ~(c1 >= first.threshold)
    second = certify_threshold(c2[left], y2[left], 0.3, 0.1)
    expert = CalibrationDocument.load(files["expert"]).method("answer").guarantee_for(0.3)
    if second.certified:
        assert expert is not None and expert.threshold == second.threshold
        assert (expert.tier, expert.after, expert.n) == (1, ["aligned"], int(left.sum()))
    else:
        assert expert is None and "nothing certified" in ok.output
        # The last tier is never judged: its answers fall outside the guarantee, the route
        # still serves (a middle tier in its place would make the route unservable).
        assert "served outside the guarantee" in ok.output
    assert np.isfinite(first.threshold)


def test_certify_refuses_a_bad_batch_naming_it(tiny_world: dict[str, Path],
                                               tmp_path: Path) -> None:
    from calibserve.cli import app

    cal = tmp_path / "calibration.json"
    cal.write_text("{}")
    before = cal.read_bytes()
    result = runner.invoke(app, ["certify", "--tier", str(tiny_world["aligned"]),
                                 "--calibration", str(cal), "--data", str(tiny_world["data"]),
                                 "--max-error", "0.2", "--batch", "0"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--batch'" in result.output and "Traceback" not in result.output
    assert cal.read_bytes() == before


CERT = {"max_error": 0.2, "delta": 0.05, "threshold": 0.5, "coverage": 0.8, "bound": 0.19,
        "n": 500, "kept": 400, "kept_errors": 60, "tier": 1, "tiers": 3, "after": ["p"]}


def _doc(*guarantees: dict[str, object]) -> str:
    import json

    answer: dict[str, object] = {"calibrator": {"type": "identity"}}
    if guarantees:
        answer["guarantees"] = list(guarantees)
    return json.dumps({"version": 2, "multiple_choice": "answer", "free_form": "mean",
                       "methods": {"answer": answer, "mean": {}}})


def test_a_tier_that_certifies_nothing_loses_its_older_certificate(
        tiny_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The middle tier's certificate for 0.2 was made before (another run, another primary):
    when certify certifies nothing for it now, that certificate is removed, so `serve` cannot
    trust it; its certificate for another max_error stays. Tiers are scored by a stand-in."""
    import calibserve.merge.certify_route as route
    from calibserve.cli import app

    n = 400
    rng = np.random.default_rng(0)
    conf = rng.random(n)
    scores = {"p": (conf, rng.random(n) < 0.5 + 0.5 * conf),  # certifiable at the top
              "mid": (conf, np.zeros(n, bool)),  # always wrong: certifies nothing
              "x": (conf, np.ones(n, bool))}
    monkeypatch.setattr(route, "_served_confidence",
                        lambda tier, items, device="cpu": scores[tier.name])
    args: list[str] = ["certify", "--data", str(tiny_world["data"]), "--max-error", "0.2"]
    stricter = {**CERT, "max_error": 0.1, "bound": 0.09, "kept_errors": 20}
    for name, doc in (("p", _doc()), ("mid", _doc(CERT, stricter)), ("x", _doc())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "calibration.json").write_text(doc)
        args += ["--tier", str(tmp_path / name)]
    bad = runner.invoke(app, [*args, "--device", "tpu"])
    assert bad.exit_code == 2 and "Invalid value for '--device'" in bad.output, bad.output
    assert (tmp_path / "mid" / "calibration.json").read_text() == _doc(CERT, stricter)
    (tmp_path / "x" / "calibration.json").write_text(_doc({**CERT, "bound": 0.3}))
    broken = runner.invoke(app, args)  # a malformed document: named, no traceback, no write
    assert broken.exit_code == 2 and "Invalid value for '--calibration'" in broken.output
    assert "not a certificate" in broken.output and "Traceback" not in broken.output
    assert (tmp_path / "mid" / "calibration.json").read_text() == _doc(CERT, stricter)
    (tmp_path / "x" / "calibration.json").write_text(_doc())

    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "tier 1 (mid): nothing certified" in ok.output
    assert "its older certificate for max_error 0.2 removed" in ok.output
    mid = CalibrationDocument.load(tmp_path / "mid" / "calibration.json").method("answer")
    assert [g.max_error for g in mid.guarantees] == [0.1]
    primary = CalibrationDocument.load(tmp_path / "p" / "calibration.json").method("answer")
    assert primary.guarantee_for(0.2) is not None and primary.guarantee_for(0.2).tier == 0
    # Run again: nothing left to remove, the middle tier's document is left as it is.
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "tier 1 (mid): nothing certified" in again.output
    assert "(document unchanged)" in again.output


def test_more_starts_certify_a_middle_tier_whose_top_holds_errors(
        tiny_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One scan stops at the middle tier's bad top (two errors among its four most confident
    answers): the route cannot be served guaranteed, and certify says --starts may help; with
    --starts 3 the middle tier is certified and its document records the starts."""
    import calibserve.merge.certify_route as route
    from calibserve.cli import app

    n = 600
    rng = np.random.default_rng(1)
    conf, mid_conf = rng.random(n), rng.random(n)
    middle_right = rng.random(n) < 0.5 + 0.5 * mid_conf
    # The middle tier's four most confident answers among those the primary leaves (it keeps
    # none below 0.7: 30% right there).
    left = np.flatnonzero(conf < 0.7)
    top = left[np.argsort(-mid_conf[left])[:4]]
    middle_right[top] = [True, True, False, False]
    scores = {"p": (conf, np.where(conf > 0.8, True, rng.random(n) < 0.3)),
              "mid": (mid_conf, middle_right), "x": (conf, np.ones(n, bool))}
    monkeypatch.setattr(route, "_served_confidence",
                        lambda tier, items, device="cpu": scores[tier.name])
    args: list[str] = ["certify", "--data", str(tiny_world["data"]), "--max-error", "0.25"]
    for name in ("p", "mid", "x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "calibration.json").write_text(_doc())
        args += ["--tier", str(tmp_path / name)]
    one = runner.invoke(app, args)
    assert one.exit_code == 0, one.output
    assert "tier 1 (mid): nothing certified" in one.output and "--starts 3 may" in one.output
    import json

    written = json.loads((tmp_path / "p" / "calibration.json").read_text())
    assert "starts" not in written["methods"]["answer"]["guarantees"][0]  # one start: unset
    bad = runner.invoke(app, [*args, "--starts", "0"])
    assert bad.exit_code == 2 and "Invalid value for '--starts'" in bad.output
    three = runner.invoke(app, [*args, "--starts", "3"])
    assert three.exit_code == 0, three.output
    assert "tier 1 (mid): threshold" in three.output
    mid = CalibrationDocument.load(tmp_path / "mid" / "calibration.json").method("answer")
    cert = mid.guarantee_for(0.25)
    assert cert is not None and cert.starts == 3 and cert.tier == 1


def test_letters_are_read_as_the_server_reads_them(tiny_world: dict[str, Path]) -> None:
    """`letter_logprobs(top_k=K)`: a letter token outside the first token's K most likely is
    absent (-inf), the rest unchanged; an item with no letter among them keeps them all. The
    model is a stand-in whose next-token logits are set by hand."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer

    from calibserve.merge.evaluate import MCEvaluator

    tokenizer = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    items = load_mc_items(tiny_world["data"] / "calibrate.jsonl")[:3]
    evaluator = MCEvaluator(tokenizer, items)
    a, b, c = evaluator.columns[:3]  # the letter tokens A, B, C
    other = next(i for i in range(len(tokenizer)) if i not in evaluator.columns)
    logits = torch.full((3, len(tokenizer)), -10.0)
    logits[0, [a, b, other]] = torch.tensor([5.0, 1.0, 3.0])  # A, then a non-letter, then B
    logits[1, [other, c]] = torch.tensor([5.0, 4.0])  # a non-letter, then C
    logits[2, other] = 5.0  # no letter near the top

    class Fixed(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
            rows = logits[[evaluator.order[i] for i in range(input_ids.shape[0])]]
            return SimpleNamespace(logits=rows[:, None, :])

    evaluator.batch_size = 3
    evaluator.order = list(range(3))  # one batch, in item order
    every = evaluator.letter_logprobs(Fixed())
    two = evaluator.letter_logprobs(Fixed(), top_k=2)
    col = {tok: k for k, tok in enumerate(evaluator.columns)}
    assert np.isfinite(two[0, col[a]]) and not np.isfinite(two[0, col[b]])  # B is third
    assert np.isfinite(two[1, col[c]]) and not np.isfinite(two[1, col[a]])
    assert np.array_equal(two[2], every[2])  # no letter in the top 2: every letter read
    finite = np.isfinite(two)
    assert np.array_equal(two[finite], every[finite])
