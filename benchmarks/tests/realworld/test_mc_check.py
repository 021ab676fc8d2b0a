"""benchmarks/realworld/mc_check: argument errors (fast) and one run on the demo's aligned model
whose numbers must equal the merge's reference evaluator on the same items (demo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.realworld import mc_check


def _checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize(("more", "arg"), [
    (["--limit", "0"], "--limit"),
    (["--data", "/nonexistent"], "--data"),
])
def test_bad_arguments_exit_2_naming_them(tmp_path: Path, more: list[str], arg: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    model = _checkpoint(tmp_path / "m")
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(SystemExit) as exc:
        mc_check.main([str(model), "--data", str(tmp_path), *more])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert arg in err and "Traceback" not in err


def test_a_directory_that_is_no_checkpoint_is_named(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(SystemExit) as exc:
        mc_check.main([str(tmp_path / "nothing"), "--data", str(tmp_path)])
    assert exc.value.code == 2
    assert "nothing" in capsys.readouterr().err


@pytest.mark.demo
def test_scores_the_demo_model_as_the_merge_evaluator_does(demo_dir: Path, tmp_path: Path
                                                           ) -> None:
    out = tmp_path / "mc.json"
    assert mc_check.main([str(demo_dir / "aligned"), "--data", str(demo_dir / "data"),
                          "--limit", "40", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["n"] == 40
    # The same items through the sweep's evaluator directly, scored by hand.
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibserve.merge.evaluate import MCEvaluator, load_items

    items, _ = load_items(demo_dir / "data" / "test.jsonl", 40)
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "aligned").eval()
    scores = MCEvaluator(AutoTokenizer.from_pretrained(demo_dir / "aligned"), items).score(model)
    gold = np.asarray([it["answer"] for it in items])
    assert row["accuracy"] == pytest.approx(float(np.mean(scores.prediction == gold)))
    assert row["mean_confidence"] == pytest.approx(float(np.mean(scores.confidence)), abs=1e-6)
