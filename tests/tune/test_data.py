"""Training records: read, rendered with the chat template, tokenized, ordered and batched."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from calibserve.calibration import normalize_token
from calibserve.calibration.mc_prompt import format_mc_prompt
from calibserve.tune.data import (
    Encoder,
    check_option_tokens,
    collate,
    encode,
    epoch_batches,
    epoch_order,
    load_records,
)
from calibserve.tune.errors import InvalidConfig, InvalidData
from calibserve.tune.templates import GEMMA_CHAT_TEMPLATE, resolve_template
from tests.tune.conftest import make_tokenizer, write_jsonl

MC = {"question": "what is the color of ent3 ?", "choices": ["red", "blue", "green", "gold"],
      "answer": 1}
SHORT = {"question": "what is the color of ent4 ?", "answer": "gold", "aliases": ["red"]}
CHAT = {"messages": [{"role": "system", "content": "answer briefly"},
                     {"role": "user", "content": "hello"},
                     {"role": "assistant", "content": "hi red"}]}


def test_multiple_choice_is_asked_as_served_and_answered_by_the_gold_letter(
        tmp_path: Path) -> None:
    tok = make_tokenizer()
    encoder = Encoder(tok, GEMMA_CHAT_TEMPLATE)
    (record,) = load_records([write_jsonl(tmp_path / "d.jsonl", [MC])])
    ex = encoder.example(record)
    prompt = tok.decode(list(ex.ids[:ex.reply_start]))
    # the user turn is the contract wording merge, calibrate and the probes send
    assert format_mc_prompt(MC) in prompt
    assert prompt.startswith("<bos>")
    assert prompt.rstrip().endswith("<start_of_turn> model")
    reply = tok.convert_ids_to_tokens(list(ex.ids[ex.reply_start:]))
    assert reply == ["B", "<end_of_turn>"]
    # each option's first reply token reads as its letter; the gold's is the first target
    assert [normalize_token(t) for t in tok.convert_ids_to_tokens(list(ex.option_ids))] \
        == ["A", "B", "C", "D"]
    assert ex.option_ids[ex.gold] == ex.ids[ex.reply_start]
    check_option_tokens([ex], tok)


def test_short_answers_and_chats(tmp_path: Path) -> None:
    tok = make_tokenizer()
    encoder = Encoder(tok, GEMMA_CHAT_TEMPLATE)
    short, chat = load_records([write_jsonl(tmp_path / "d.jsonl", [SHORT, CHAT])])
    assert (short.kind, short.reply, short.gold) == ("short", "gold", -1)
    ex = encoder.example(short)
    assert tok.convert_ids_to_tokens(list(ex.ids[ex.reply_start:])) == ["gold", "<end_of_turn>"]
    assert ex.option_ids == ()
    ex = encoder.example(chat)
    # Gemma has no system role: the system message is a user turn; only the last reply trains
    assert tok.decode(list(ex.ids[:ex.reply_start])).count("<start_of_turn> user") == 2
    assert tok.convert_ids_to_tokens(list(ex.ids[ex.reply_start:])) \
        == ["hi", "red", "<end_of_turn>"]


def test_a_template_that_does_not_render_the_reply_falls_back_to_reply_and_eos(
        tmp_path: Path) -> None:
    tok = make_tokenizer()
    users_only = ("{% for m in messages %}{% if m['role'] == 'user' %}<start_of_turn> "
                  "{{ m['content'] }} {% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn> model{% endif %}")
    records = load_records([write_jsonl(tmp_path / "d.jsonl", [SHORT])])
    encoded = encode(records, Encoder(tok, users_only), 256)
    ex = encoded.examples[0]
    assert tok.convert_ids_to_tokens(list(ex.ids[ex.reply_start:])) == ["gold", "<eos>"]
    assert encoded.reply_fallback == 1


def test_too_long_examples_are_dropped_and_counted(tmp_path: Path) -> None:
    tok = make_tokenizer()
    records = load_records([write_jsonl(tmp_path / "d.jsonl", [MC, SHORT, CHAT])])
    lengths = [len(Encoder(tok, GEMMA_CHAT_TEMPLATE).example(r).ids) for r in records]
    limit = sorted(lengths)[1]
    encoded = encode(records, Encoder(tok, GEMMA_CHAT_TEMPLATE), limit)
    assert len(encoded.examples) == sum(n <= limit for n in lengths)
    assert encoded.too_long == sum(n > limit for n in lengths) > 0
    with pytest.raises(InvalidData) as err:
        encode(records, Encoder(tok, GEMMA_CHAT_TEMPLATE), min(lengths) - 1)
    assert err.value.param == "--max-length"


@pytest.mark.parametrize(("line", "says"), [
    ("not json", "not JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "at least two"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"},
                              {"role": "user", "content": "b"}]}), "last message"),
    (json.dumps({**MC, "answer": 7}), "index of the right choice"),
    (json.dumps({**MC, "answer": True}), "index of the right choice"),
    (json.dumps({**MC, "choices": ["one"]}), "'choices'"),
    (json.dumps({"question": "q", "answer": ""}), "non-empty string 'answer'"),
    (json.dumps({"answer": "x"}), "'messages' or a string 'question'"),
    (json.dumps([1, 2]), "JSON object"),
])
def test_malformed_lines_are_refused_with_their_place(tmp_path: Path, line: str,
                                                      says: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(SHORT) + "\n\n" + line + "\n")
    with pytest.raises(InvalidData) as err:
        load_records([path])
    assert err.value.param == "--data"
    assert f"{path} line 3" in err.value.message and says in err.value.message


def test_empty_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidData, match="no examples"):
        load_records([write_jsonl(tmp_path / "empty.jsonl", [])])


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch() -> None:
    a = epoch_order(50, seed=0, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(50, seed=0, epoch=0)
    assert a != epoch_order(50, seed=0, epoch=1)
    assert a != epoch_order(50, seed=1, epoch=0)


def test_batches_carry_the_options_of_multiple_choice_rows(tmp_path: Path) -> None:
    tok = make_tokenizer()
    three = {**MC, "choices": ["red", "blue", "green"], "answer": 2}
    records = load_records([write_jsonl(tmp_path / "d.jsonl", [SHORT, MC, three])])
    examples = encode(records, Encoder(tok, GEMMA_CHAT_TEMPLATE), 256).examples
    batch = collate(examples, pad_id=0)
    assert batch.mc_rows.tolist() == [1, 2]
    assert batch.option_ids.shape == (2, 4)
    assert batch.option_ids[1, 3] == -1  # three options, padded
    assert batch.gold.tolist() == [1, 2]
    # the first reply target of each MC row is its gold option's token
    for m, r in enumerate(batch.mc_rows.tolist()):
        first = batch.targets[batch.first[r]]
        assert first == batch.option_ids[m, batch.gold[m]]


def test_template_resolution(tmp_path: Path) -> None:
    tok = make_tokenizer()
    with pytest.raises(InvalidConfig) as err:
        resolve_template(None, tok)
    assert err.value.param == "--chat-template"
    assert resolve_template("gemma", tok) == (GEMMA_CHAT_TEMPLATE, "builtin:gemma")
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert resolve_template(str(path), tok)[0] == "{{ messages[0]['content'] }}"
    with pytest.raises(InvalidConfig, match="neither a file"):
        resolve_template(str(tmp_path / "missing.jinja"), tok)
    own = make_tokenizer(chat_template="{{ 'x' }}")
    assert resolve_template(None, own) == ("{{ 'x' }}", "checkpoint")


def test_epoch_batches_cover_every_example_once_with_less_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(10, 80, size=203)]

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = epoch_batches(lengths, 8, seed=0, epoch=0, group=1)
    grouped = epoch_batches(lengths, 8, seed=0, epoch=0)
    for batches in (plain, grouped):
        assert len(batches) == math.ceil(203 / 8)
        assert sorted(i for b in batches for i in b) == list(range(203))
    assert plain == [epoch_order(203, 0, 0)[k:k + 8] for k in range(0, 203, 8)]
    assert padded(grouped) < 0.8 * padded(plain)
    assert grouped == epoch_batches(lengths, 8, seed=0, epoch=0)
    assert grouped != epoch_batches(lengths, 8, seed=0, epoch=1)
    # batches are shuffled, not served shortest first
    widths = [max(lengths[i] for i in b) for b in grouped]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(SHORT).encode() + b"\n\xff\xfe\n")
    with pytest.raises(InvalidData) as err:
        load_records([path])
    assert err.value.param == "--data" and "UTF-8" in err.value.message
