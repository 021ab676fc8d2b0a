"""Validation of the parents: what is accepted, what is refused and how the refusal reads."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from calibserve.merge.checkpoint import check_tokenizers, open_checkpoint, plan_pair
from calibserve.merge.errors import IncompatibleCheckpoints, InputNotFound
from calibserve.testing.checkpoints import make_tokenizer
from tests.merge.conftest import write_raw_checkpoint

CFG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 8,
    "tie_word_embeddings": False,
}


def _raw(path: Path, **tensors: torch.Tensor) -> Path:
    return write_raw_checkpoint(path, {k.replace("__", "."): v for k, v in tensors.items()}, CFG)


def test_matching_pair_is_planned_in_checkpoint_order(tiny_world: dict[str, Path]) -> None:
    plan = plan_pair(
        open_checkpoint(str(tiny_world["base"]), "--base"),
        open_checkpoint(str(tiny_world["aligned"]), "--aligned"),
    )
    names = [t.name for t in plan.tensors]
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert not plan.tied and not any(t.grown for t in plan.tensors)
    check_tokenizers(plan)  # same tokenizer: accepted


def test_missing_directory_and_bad_hub_id(tmp_path: Path) -> None:
    with pytest.raises(InputNotFound) as err:
        open_checkpoint(str(tmp_path / "nope"), "--base")
    assert err.value.param == "--base" and "does not exist" in err.value.message
    with pytest.raises(InputNotFound):
        open_checkpoint("not a/hub id/at all", "--aligned")


def test_hub_ids_are_fetched_with_snapshot_download(
    tiny_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls: list[str] = []

    def fake(repo_id: str, **kw: object) -> str:
        calls.append(repo_id)
        assert "*.safetensors" in kw["allow_patterns"]  # type: ignore[operator]
        return str(tiny_world["base"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    ck = open_checkpoint("someorg/some-model", "--base")
    assert calls == ["someorg/some-model"] and ck.path == tiny_world["base"]
    assert ck.ref == "someorg/some-model"


def test_pickle_only_checkpoints_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG))
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputNotFound, match="convert them to safetensors"):
        open_checkpoint(str(d), "--base")


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    a = _raw(tmp_path / "a", w=torch.zeros(4, 3), v=torch.zeros(2))
    b = _raw(tmp_path / "b", w=torch.zeros(4, 5), v=torch.zeros(2))
    with pytest.raises(IncompatibleCheckpoints) as err:
        plan_pair(open_checkpoint(str(a), "--base"), open_checkpoint(str(b), "--aligned"))
    assert "w (base [4, 3], aligned [4, 5])" in err.value.message
    assert " v " not in err.value.message


def test_missing_tensor_names_the_tensor(tmp_path: Path) -> None:
    a = _raw(tmp_path / "a", w=torch.zeros(2), extra__bias=torch.zeros(2))
    b = _raw(tmp_path / "b", w=torch.zeros(2))
    with pytest.raises(IncompatibleCheckpoints, match=r"only in base: extra\.bias"):
        plan_pair(open_checkpoint(str(a), "--base"), open_checkpoint(str(b), "--aligned"))


def test_architecture_mismatch_is_refused(tmp_path: Path) -> None:
    a = _raw(tmp_path / "a", w=torch.zeros(2))
    b = _raw(tmp_path / "b", w=torch.zeros(2))
    (b / "config.json").write_text(json.dumps({**CFG, "model_type": "mistral"}))
    with pytest.raises(IncompatibleCheckpoints, match="model_type"):
        plan_pair(open_checkpoint(str(a), "--base"), open_checkpoint(str(b), "--aligned"))


def test_vocabulary_growth_is_planned_and_shrinking_is_refused(
    pair_factory: Callable[..., tuple[Path, Path]],
) -> None:
    base, aligned = pair_factory(grow=3)
    plan = plan_pair(
        open_checkpoint(str(base), "--base"), open_checkpoint(str(aligned), "--aligned")
    )
    grown = {t.name for t in plan.tensors if t.grown}
    assert grown == {"model.embed_tokens.weight", "lm_head.weight"}
    assert any("vocabulary grew" in n for n in plan.notes)
    check_tokenizers(plan)  # aligned tokenizer extends the base one
    with pytest.raises(IncompatibleCheckpoints, match="larger than the aligned"):
        plan_pair(open_checkpoint(str(aligned), "--base"), open_checkpoint(str(base), "--aligned"))


def test_tokenizer_with_moved_ids_is_refused(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "aligned"
    shutil.copytree(tiny_world["aligned"], other)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (other / f).unlink(missing_ok=True)
    tok = make_tokenizer()
    vocab = tok.get_vocab()
    # Swap two words: same size, same shapes, different meaning.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab["red"], vocab["blue"] = vocab["blue"], vocab["red"]
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(other)
    plan = plan_pair(
        open_checkpoint(str(tiny_world["base"]), "--base"), open_checkpoint(str(other), "--aligned")
    )
    with pytest.raises(IncompatibleCheckpoints, match="tokenizers differ") as err:
        check_tokenizers(plan)
    assert "'red'" in err.value.message and "'blue'" in err.value.message


def test_one_tied_parent_is_merged_untied(pair_factory: Callable[..., tuple[Path, Path]]) -> None:
    base, _ = pair_factory(tie=True)
    _, aligned = pair_factory(tie=False)
    b = open_checkpoint(str(base), "--base")
    assert b.tied and "lm_head.weight" not in b.tensors
    plan = plan_pair(b, open_checkpoint(str(aligned), "--aligned"))
    head = next(t for t in plan.tensors if t.name == "lm_head.weight")
    assert head.base.name == "model.embed_tokens.weight"  # the tied head is the embedding
    assert not plan.tied and plan.out_config()["tie_word_embeddings"] is False
    both = plan_pair(b, open_checkpoint(str(base), "--aligned"))
    assert both.tied and "lm_head.weight" not in {t.name for t in both.tensors}
