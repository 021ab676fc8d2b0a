"""`calibserve tune` on the demo world's base model with its own chat template (the demo marker:
it needs the world, built once per session and cached)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from calibserve.cli import app
from calibserve.tune.data import Encoder, load_records


def test_tune_the_demo_base_on_its_own_template(demo_dir: Path, tmp_path: Path) -> None:
    base, data = demo_dir / "base", demo_dir / "data"
    tok = AutoTokenizer.from_pretrained(base)
    # the demo's format: the reply is the answer and <|end|>, as the demo's own SFT trains it
    mc = next(r for r in load_records([data / "select.jsonl"]) if r.kind == "mc")
    ex = Encoder(tok, tok.chat_template).example(mc)
    assert tok.convert_ids_to_tokens(list(ex.ids[ex.reply_start:])) == [mc.reply, "<|end|>"]

    out = tmp_path / "tuned"
    result = CliRunner().invoke(app, [
        "tune", "--model", str(base), "--data", str(data / "select.jsonl"),
        "--data", str(data / "short_select.jsonl"), "--out", str(out), "--max-steps", "3",
        "--calibration-aware", "rcft", "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "train_info.json").read_text())
    assert info["recipe"]["chat_template"] == "checkpoint"
    assert info["data"]["by_kind"]["mc"] > 0 and info["data"]["by_kind"]["short"] > 0
    assert info["calibration_aware"]["bin_estimates"][0]["step"] == 0
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
