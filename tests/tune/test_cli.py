"""`calibserve tune` end to end on a tiny random Llama: the checkpoint it writes, LoRA, resume,
atomic output and errors that name the argument."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner, Result

from calibserve.cli import app
from calibserve.tune import checkpoint
from calibserve.tune.data import Encoder, collate, encode, load_records
from calibserve.tune.reply_loss import reply_logits, reply_loss
from calibserve.tune.templates import GEMMA_CHAT_TEMPLATE
from calibserve.tune.trainer import Trainer
from tests.tune.conftest import write_jsonl

runner = CliRunner()
FAST = ("--chat-template", "gemma", "--quiet", "--device", "cpu", "--batch-size", "8",
        "--autocast", "off")


def tune(model: Path, data: Path, out: Path, *extra: str) -> Result:
    return runner.invoke(app, ["tune", "--model", str(model), "--data", str(data),
                               "--out", str(out), *FAST, *extra])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def data_loss(model_dir: Path, data: Path) -> float:
    """Mean reply loss of a checkpoint over the training data (the Gemma template)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = encode(load_records([data]), Encoder(tok, GEMMA_CHAT_TEMPLATE), 256).examples
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = collate(examples, int(tok.pad_token_id))
    with torch.no_grad():
        return float(reply_loss(reply_logits(model, batch), batch))


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_full_tuning_writes_a_complete_checkpoint(tiny_llama: Path, train_data: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "tuned"
    result = tune(tiny_llama, train_data, out, "--max-steps", "12", "--epochs", "3",
                  "--lr", "3e-3")
    assert result.exit_code == 0, result.output
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "chat_template.jinja", "train_info.json"):
        assert (out / name).is_file(), name
    assert (out / "chat_template.jinja").read_text() == GEMMA_CHAT_TEMPLATE
    assert not (tmp_path / "tuned.partial").exists() and not no_leftovers(tmp_path)

    # the tokenizer is the base one, id for id (merge needs it), now with the template
    before, after = AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(out)
    assert after.get_vocab() == before.get_vocab()
    assert after.chat_template == GEMMA_CHAT_TEMPLATE
    # generation stops where a trained reply stops
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert after.convert_tokens_to_ids("<end_of_turn>") in eos

    # float32, the embedding (tied to the head) unchanged, the layers trained
    old, new = weights(tiny_llama), weights(out)
    assert set(old) == set(new) and all(t.dtype == torch.float32 for t in new.values())
    assert torch.equal(old["model.embed_tokens.weight"], new["model.embed_tokens.weight"])
    assert not torch.equal(old["model.layers.0.mlp.up_proj.weight"],
                           new["model.layers.0.mlp.up_proj.weight"])
    # ... and trained towards the replies
    assert data_loss(out, train_data) < data_loss(tiny_llama, train_data) - 0.5

    info = json.loads((out / "train_info.json").read_text())
    assert info["recipe"]["lr"] == 3e-3 and info["recipe"]["total_steps"] == 12
    assert info["recipe"]["chat_template"] == "builtin:gemma"
    assert info["data"]["sha256"] == hashlib.sha256(train_data.read_bytes()).hexdigest()
    assert info["data"]["examples"] == 40
    assert info["data"]["by_kind"] == {"mc": 14, "short": 13, "chat": 13}
    assert info["data"]["reply_tokens"] < info["data"]["tokens"]
    assert info["parameters"]["embedding_frozen"] is True
    assert info["parameters"]["output_head_tied_to_embedding"] is True
    assert info["parameters"]["trainable"] < info["parameters"]["total"]
    assert len(info["loss"]["per_step"]) == 12 and info["loss"]["last"] < info["loss"]["first"]
    assert info["time"]["cpu_minutes"] > 0.001 and info["time"]["sessions"] == 1
    assert info["device"]["type"] == "cpu" and info["versions"]["torch"] == torch.__version__


def test_train_embedding_trains_it(tiny_llama: Path, train_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "tuned"
    threads = torch.get_num_threads()
    result = tune(tiny_llama, train_data, out, "--max-steps", "2", "--train-embedding",
                  "--threads", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "train_info.json").read_text())["device"]["threads"] == 1
    assert torch.get_num_threads() == threads  # put back for whoever called it in-process
    assert not torch.equal(weights(tiny_llama)["model.embed_tokens.weight"],
                           weights(out)["model.embed_tokens.weight"])


def test_lora_output_is_merged_and_loads(tiny_llama: Path, train_data: Path,
                                         tmp_path: Path) -> None:
    out = tmp_path / "lora"
    result = tune(tiny_llama, train_data, out, "--method", "lora", "--lora-rank", "4",
                  "--lr", "1e-2", "--max-steps", "6")
    assert result.exit_code == 0, result.output
    old, new = weights(tiny_llama), weights(out)
    assert set(new) == set(old)  # plain weights: no adapter tensors left
    assert not torch.equal(old["model.layers.1.self_attn.q_proj.weight"],
                           new["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(old["model.embed_tokens.weight"], new["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    info = json.loads((out / "train_info.json").read_text())
    assert info["recipe"]["lora_alpha"] == 8 and info["recipe"]["method"] == "lora"
    assert info["parameters"]["trainable"] < info["parameters"]["total"] / 5
    assert data_loss(out, train_data) < data_loss(tiny_llama, train_data)


def test_a_stopped_run_resumes_to_the_same_weights(tiny_llama: Path, train_data: Path,
                                                   tmp_path: Path) -> None:
    # 40 examples, batch 8: 5 steps an epoch; 7 steps cross an epoch boundary
    args = ("--max-steps", "7", "--epochs", "2", "--lr", "3e-3", "--save-every", "3")
    whole = tmp_path / "whole"
    assert tune(tiny_llama, train_data, whole, *args).exit_code == 0
    split = tmp_path / "split"
    first = tune(tiny_llama, train_data, split, *args, "--stop-after", "4")
    assert first.exit_code == 0, first.output
    assert "Stopped after step 4 of 7" in first.output
    assert not split.exists() and (tmp_path / "split.partial" / "state.pt").is_file()
    # other settings do not resume it
    other = tune(tiny_llama, train_data, split, *args[:-4], "--lr", "1e-3", "--save-every", "3")
    assert other.exit_code == 2 and "'--out'" in other.output and "lr" in other.output
    second = tune(tiny_llama, train_data, split, *args)
    assert second.exit_code == 0, second.output
    a, b = weights(whole), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    info_a = json.loads((whole / "train_info.json").read_text())
    info_b = json.loads((split / "train_info.json").read_text())
    assert info_a["loss"]["per_step"] == info_b["loss"]["per_step"]
    assert info_b["time"]["sessions"] == 2
    assert info_a["data"]["tokens_trained"] == info_b["data"]["tokens_trained"]
    assert not (tmp_path / "split.partial").exists()


def test_sigterm_saves_and_exits_then_resumes(tiny_llama: Path, train_data: Path,
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_step = Trainer.step

    def step_then_term(self: Trainer, state: Any) -> float:
        loss = real_step(self, state)
        if state.step == 1:  # the second step: state.step is incremented after the call
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(Trainer, "step", step_then_term)
    out = tmp_path / "out"
    stopped = tune(tiny_llama, train_data, out, "--max-steps", "4", "--save-every", "0")
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.output
    assert "Stopped after step 2 of 4" in stopped.output and not out.exists()
    monkeypatch.setattr(Trainer, "step", real_step)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back
    resumed = tune(tiny_llama, train_data, out, "--max-steps", "4", "--save-every", "0")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "train_info.json").read_text())["loss"]["steps"] == 4


def test_a_failed_run_leaves_no_checkpoint(tiny_llama: Path, train_data: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> str:
        raise OSError("disk full")

    # fails after the weights and tokenizer are written into the staging directory
    monkeypatch.setattr(checkpoint, "json", SimpleNamespace(dumps=boom))
    out = tmp_path / "out"
    result = tune(tiny_llama, train_data, out, "--max-steps", "1")
    assert isinstance(result.exception, OSError)
    assert not out.exists() and not no_leftovers(tmp_path)


@pytest.mark.parametrize(("extra", "flag"), [
    (("--method", "sgd"), "--method"),
    (("--device", "tpu"), "--device"),
    (("--lr", "-1"), "--lr"),
    (("--batch-size", "0"), "--batch-size"),
    (("--lora-targets", "q proj"), "--lora-targets"),
    (("--method", "lora", "--train-embedding"), "--train-embedding"),
    (("--method", "lora", "--lora-targets", "nope_proj"), "--lora-targets"),
    (("--chat-template", "missing.jinja"), "--chat-template"),
])
def test_bad_arguments_exit_2_naming_them(tiny_llama: Path, train_data: Path, tmp_path: Path,
                                          extra: tuple[str, ...], flag: str) -> None:
    result = tune(tiny_llama, train_data, tmp_path / "out", "--max-steps", "1", *extra)
    assert result.exit_code == 2, result.output
    assert flag in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_missing_inputs_and_existing_output(tiny_llama: Path, train_data: Path,
                                            tmp_path: Path) -> None:
    missing = tune(tiny_llama, tmp_path / "nope.jsonl", tmp_path / "out")
    assert missing.exit_code == 2 and "'--data'" in missing.output
    assert "nope.jsonl" in missing.output
    no_model = tune(tmp_path / "no-model", train_data, tmp_path / "out")
    assert no_model.exit_code == 2 and "'--model'" in no_model.output
    (tmp_path / "empty-dir").mkdir()
    not_ckpt = tune(tmp_path / "empty-dir", train_data, tmp_path / "out")
    assert not_ckpt.exit_code == 2 and "'--model'" in not_ckpt.output
    no_template = runner.invoke(app, ["tune", "--model", str(tiny_llama), "--data",
                                      str(train_data), "--out", str(tmp_path / "out"), "--quiet"])
    assert no_template.exit_code == 2 and "'--chat-template'" in no_template.output
    (tmp_path / "taken").mkdir()
    taken = tune(tiny_llama, train_data, tmp_path / "taken")
    assert taken.exit_code == 2 and "'--out'" in taken.output


def test_calibration_aware_needs_multiple_choice(tiny_llama: Path, tmp_path: Path) -> None:
    only_short = write_jsonl(tmp_path / "short.jsonl",
                             [{"question": "what is the color of ent1 ?", "answer": "red"}])
    for mode in ("cft", "rcft"):
        no_mc = tune(tiny_llama, only_short, tmp_path / "out", "--calibration-aware", mode)
        assert no_mc.exit_code == 2 and "'--data'" in no_mc.output, no_mc.output
    bad = tune(tiny_llama, only_short, tmp_path / "out", "--calibration-aware", "xft")
    assert bad.exit_code == 2 and "--calibration-aware" in bad.output


def test_the_cli_default_alpha_is_the_objective_default() -> None:
    from calibserve.tune.calibration_aware import DEFAULT_ALPHA
    from calibserve.tune.config import TuneConfig

    assert TuneConfig.model_fields["cal_alpha"].default == DEFAULT_ALPHA


def test_rcft_trains_on_the_calibration_term_and_resumes_exactly(
        tiny_llama: Path, train_data: Path, tmp_path: Path) -> None:
    """alpha 1: the loss is the calibration term alone, so the weights move differently from
    plain SFT; the E step runs every 2 steps and is saved with the state, so a stopped run
    resumes to the same weights."""
    args = ("--max-steps", "5", "--lr", "3e-3", "--calibration-aware", "rcft",
            "--cal-alpha", "1.0", "--cal-estimate-every", "2", "--save-every", "0")
    whole = tmp_path / "whole"
    result = tune(tiny_llama, train_data, whole, *args)
    assert result.exit_code == 0, result.output
    info = json.loads((whole / "train_info.json").read_text())["calibration_aware"]
    assert info["mode"] == "rcft" and info["alpha"] == 1.0
    assert [e["step"] for e in info["bin_estimates"]] == [0, 2, 4]
    assert all(sum(e["counts"]) == 14 for e in info["bin_estimates"])  # every MC example
    sft = tmp_path / "sft"
    assert tune(tiny_llama, train_data, sft, "--max-steps", "5", "--lr", "3e-3").exit_code == 0
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(weights(whole)[key], weights(sft)[key])

    split = tmp_path / "split"
    assert tune(tiny_llama, train_data, split, *args, "--stop-after", "3").exit_code == 0
    assert tune(tiny_llama, train_data, split, *args).exit_code == 0
    a, b = weights(whole), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((split / "train_info.json").read_text())["calibration_aware"]
    assert resumed["bin_estimates"] == info["bin_estimates"]


def test_cft_is_the_answer_only_sft(tiny_llama: Path, train_data: Path, tmp_path: Path) -> None:
    """CFT has no calibration term (the paper's CFT): the same weights as plain SFT."""
    plain, cft = tmp_path / "plain", tmp_path / "cft"
    assert tune(tiny_llama, train_data, plain, "--max-steps", "3").exit_code == 0
    result = tune(tiny_llama, train_data, cft, "--max-steps", "3", "--calibration-aware", "cft")
    assert result.exit_code == 0, result.output
    a, b = weights(plain), weights(cft)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((cft / "train_info.json").read_text())["calibration_aware"][
        "bin_estimates"] == []


def test_a_second_run_into_the_same_out_is_refused(tiny_llama: Path, train_data: Path,
                                                   tmp_path: Path) -> None:
    from calibserve.publish import exclusive, lock_path
    from calibserve.tune.resume import partial_dir

    out = tmp_path / "out"
    with exclusive(lock_path(partial_dir(out))):  # as a running `calibserve tune` holds it
        busy = tune(tiny_llama, train_data, out, "--max-steps", "1")
    assert busy.exit_code == 2 and "'--out'" in busy.output and "another" in busy.output
    assert tune(tiny_llama, train_data, out, "--max-steps", "1").exit_code == 0


def test_a_log_that_is_no_terminal_shows_the_steps(tiny_llama: Path, train_data: Path,
                                                   tmp_path: Path) -> None:
    # under nohup or CI rich draws the bar once, at the end: plain step lines stand in for it
    import io

    from rich.console import Console

    from calibserve.tune.config import TuneConfig
    from calibserve.tune.pipeline import run_tune

    buffer = io.StringIO()
    config = TuneConfig(model=str(tiny_llama), data=[train_data], out=tmp_path / "tuned",
                        chat_template="gemma", device="cpu", batch_size=8, autocast="off",
                        max_steps=10)
    result = run_tune(config, console=Console(file=buffer, force_terminal=False, width=120))
    total = result.info["recipe"]["total_steps"]
    assert total >= 2
    lines = [ln for ln in buffer.getvalue().splitlines() if ln.startswith("tune step ")]
    # fewer than 20 steps: every step has its line
    assert [ln.split()[2] for ln in lines] == [f"{k}/{total}" for k in range(1, total + 1)]
    assert all(ln.endswith(" s/step") and " loss " in ln for ln in lines)


def test_a_terminal_gets_the_bar_and_no_step_lines() -> None:
    import io

    from rich.console import Console

    from calibserve.tune.progress import step_log

    terminal_out, log_out = io.StringIO(), io.StringIO()
    terminal = Console(file=terminal_out, force_terminal=True)
    step_log(terminal, True, 100)(5, 0.5, 1.0)
    log_file = Console(file=log_out, force_terminal=False)
    step_log(log_file, True, 100)(5, 0.5, 1.0)
    step_log(log_file, True, 100)(6, 0.5, 1.0)  # not a 5% step
    step_log(log_file, False, 100)(10, 0.5, 1.0)  # --quiet
    assert terminal_out.getvalue() == ""
    assert log_out.getvalue() == "tune step 5/100 loss 0.5000 1.00 s/step\n"
