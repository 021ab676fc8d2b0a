"""Training examples: JSONL records read, rendered with the chat template, tokenized and batched.

A line of a training file is one of
- a chat: `{"messages": [{"role", "content"}, ...]}` whose last message is the assistant's
  reply (the one that is trained on; the earlier turns are the prompt);
- a multiple-choice eval item `{"question", "choices", "answer": int, "prompt"?}`: the user
  message is `format_mc_prompt(item)`, as merge, calibrate and the server's probes ask it, and
  the reply is the gold option's letter;
- a short-answer eval item `{"question", "answer": str, "aliases"?}`: the question is the user
  message and the gold answer is the reply (aliases are for grading, not training).

The prompt is the template rendered with the generation prompt and tokenized without adding
special tokens (as vLLM's chat endpoint does); the reply is what the template renders after it
for the assistant turn (for Gemma's `B<end_of_turn>\n`), tokenized on its own, so the first reply
token is the one the model emits first and the one the server reads an option letter from. Every
reply token, the end-of-turn ones included, is a target; no prompt token is.

For a multiple-choice example the batch also carries, for each option letter, that first reply
token (the reply the letter would be) and the gold option's index: what the calibration-aware
objective restricts the first token's logits to.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from calibserve.calibration import normalize_token
from calibserve.calibration.mc_prompt import LETTERS, format_mc_prompt
from calibserve.tune.errors import InvalidData

__all__ = [
    "Record",
    "Example",
    "Encoded",
    "Batch",
    "load_records",
    "Encoder",
    "encode",
    "collate",
    "check_option_tokens",
    "epoch_order",
    "epoch_batches",
    "LENGTH_GROUP",
    "data_digest",
]

Kind = Literal["chat", "mc", "short"]


@dataclass(frozen=True, slots=True)
class Record:
    """One training example before tokenization: the prompt turns and the reply."""

    messages: tuple[Mapping[str, str], ...]
    reply: str
    kind: Kind
    n_options: int = 0  # multiple choice: how many options
    gold: int = -1  # multiple choice: the gold option's index


@dataclass(frozen=True, slots=True)
class Example:
    """A tokenized example: `ids[reply_start:]` are the reply (the targets)."""

    ids: tuple[int, ...]
    reply_start: int
    option_ids: tuple[int, ...] = ()  # multiple choice: first reply token of each option letter
    gold: int = -1


@dataclass(frozen=True, slots=True)
class Encoded:
    examples: list[Example]
    too_long: int  # records dropped because prompt + reply exceeded --max-length
    kinds: dict[str, int] = field(default_factory=dict)  # records kept, per kind
    reply_fallback: int = 0  # replies rendered as reply + EOS (the template's did not extend)

    @property
    def n_tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)

    @property
    def n_reply_tokens(self) -> int:
        return sum(len(e.ids) - e.reply_start for e in self.examples)


# ---------------------------------------------------------------------------------------------
# reading


def _where(path: Path, lineno: int) -> str:
    return f"{path} line {lineno}"


def _chat_record(obj: Mapping[str, Any], where: str) -> Record:
    messages = obj["messages"]
    ok = isinstance(messages, list) and len(messages) >= 2 and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise InvalidData(f"{where}: 'messages' must be a list of at least two "
                          "{\"role\": str, \"content\": str} objects", "--data")
    *prompt, last = messages
    if last["role"] != "assistant":
        raise InvalidData(f"{where}: the last message must be the assistant's reply (the one "
                          f"trained on), not {last['role']!r}", "--data")
    turns = tuple({"role": m["role"], "content": m["content"]} for m in prompt)
    return Record(turns, last["content"], "chat")


def _item_record(obj: Mapping[str, Any], where: str) -> Record:
    if not isinstance(obj.get("question"), str):
        raise InvalidData(f"{where}: an item needs 'messages' or a string 'question'", "--data")
    if "choices" in obj:
        choices, answer = obj["choices"], obj.get("answer")
        if not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS)
                and all(isinstance(c, str) for c in choices)):
            raise InvalidData(f"{where}: 'choices' must be 2 to {len(LETTERS)} strings", "--data")
        if isinstance(answer, bool) or not isinstance(answer, int) \
                or not 0 <= answer < len(choices):
            raise InvalidData(f"{where}: 'answer' must be the index of the right choice",
                              "--data")
        if "prompt" in obj and not isinstance(obj["prompt"], str):
            raise InvalidData(f"{where}: 'prompt' must be a string (the user message)", "--data")
        user = {"role": "user", "content": format_mc_prompt(obj)}
        return Record((user,), LETTERS[answer], "mc", len(choices), answer)
    answer = obj.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise InvalidData(f"{where}: a short-answer item needs a non-empty string 'answer'",
                          "--data")
    return Record(({"role": "user", "content": obj["question"]},), answer, "short")


def load_records(paths: Sequence[Path]) -> list[Record]:
    """Every record of the JSONL files, in order; a malformed line is refused with its place."""
    records: list[Record] = []
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028
        except UnicodeDecodeError as exc:
            raise InvalidData(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                              "--data") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = _where(path, lineno)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidData(f"{where}: not JSON ({exc.msg})", "--data") from None
            if not isinstance(obj, Mapping):
                raise InvalidData(f"{where}: a line must be a JSON object", "--data")
            records.append(_chat_record(obj, where) if "messages" in obj
                           else _item_record(obj, where))
    if not records:
        raise InvalidData("the training files hold no examples", "--data")
    return records


def data_digest(paths: Sequence[Path]) -> tuple[str, dict[str, str]]:
    """sha256 of the files' bytes in order, and each file's own."""
    total = hashlib.sha256()
    each: dict[str, str] = {}
    for path in paths:
        h = hashlib.sha256()
        with Path(path).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                total.update(chunk)
        each[str(path)] = h.hexdigest()
    return total.hexdigest(), each


# ---------------------------------------------------------------------------------------------
# tokenizing


class Encoder:
    """Renders records with one chat template and tokenizes prompt and reply apart."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.fallbacks = 0

    def _render(self, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], chat_template=self.template,
            add_generation_prompt=generation_prompt, tokenize=False)
        return str(text)

    def _ids(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def prompt(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[int]]:
        head = self._render(messages, True)
        return head, self._ids(head)

    def reply_text(self, messages: Sequence[Mapping[str, str]], head: str, reply: str) -> str:
        """What the template renders after the generation prompt for this reply; a template
        whose full rendering does not extend the prompt gets the reply followed by EOS."""
        full = self._render([*messages, {"role": "assistant", "content": reply}], False)
        if full.startswith(head) and len(full) > len(head):
            return full[len(head):]
        self.fallbacks += 1
        eos = self.tokenizer.eos_token
        return reply + (eos if isinstance(eos, str) else "")

    def reply_ids(self, messages: Sequence[Mapping[str, str]], head: str, reply: str) -> list[int]:
        return self._ids(self.reply_text(messages, head, reply))

    def example(self, record: Record) -> Example:
        head, prompt_ids = self.prompt(record.messages)
        if not prompt_ids:  # the first reply token is predicted from the last prompt token
            raise InvalidData("the chat template renders an empty prompt", "--chat-template")
        reply_ids = self.reply_ids(record.messages, head, record.reply)
        if not reply_ids:
            raise InvalidData(f"the reply {record.reply!r} renders to no tokens", "--data")
        options: tuple[int, ...] = ()
        if record.kind == "mc":
            options = tuple(
                reply_ids[0] if k == record.gold
                else self.reply_ids(record.messages, head, LETTERS[k])[0]
                for k in range(record.n_options))
        return Example(tuple(prompt_ids + reply_ids), len(prompt_ids), options, record.gold)


def check_option_tokens(examples: Sequence[Example], tokenizer: Any) -> None:
    """Each option letter's first reply token must read as that letter (as the server reads it)
    and the letters must differ; else the option view of a multiple-choice item is meaningless."""
    for ex in examples:
        if not ex.option_ids:
            continue
        tokens = tokenizer.convert_ids_to_tokens(list(ex.option_ids))
        labels = [normalize_token(str(t)) for t in tokens]
        if labels != list(LETTERS[: len(labels)]):
            raise InvalidData(
                "under this chat template the replies A, B, ... do not start with a letter "
                f"token (first tokens {tokens}), so the server could not read them",
                "--chat-template")
        return  # the template's tail is the same for every example


def encode(records: Sequence[Record], encoder: Encoder, max_length: int) -> Encoded:
    """Tokenized examples; those longer than `max_length` are dropped (and counted), never cut:
    a cut prompt is not what the model will be asked, a cut reply not what it should say."""
    kept: list[Example] = []
    kinds: dict[str, int] = {}
    too_long = 0
    for record in records:
        ex = encoder.example(record)
        if len(ex.ids) > max_length:
            too_long += 1
            continue
        kept.append(ex)
        kinds[record.kind] = kinds.get(record.kind, 0) + 1
    if not kept:
        raise InvalidData(f"every example is longer than {max_length} tokens", "--max-length")
    return Encoded(kept, too_long, kinds, encoder.fallbacks)


# ---------------------------------------------------------------------------------------------
# batching


# Batches are cut from runs of this many batches' worth of shuffled examples sorted by length.
LENGTH_GROUP = 16


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order examples are visited in during `epoch`: a permutation fixed by (seed, epoch),
    so a resumed run visits them exactly as the uninterrupted one would."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group: int = LENGTH_GROUP) -> list[list[int]]:
    """The batches of `epoch`, fixed by (seed, epoch): every example once, ceil(n / batch_size)
    batches. With `group` > 1 the shuffled examples are cut into runs of `group` batches' worth,
    each run sorted by length and cut into batches, and the batches shuffled: examples of like
    length share a batch, so little of it is padding (on the world facts, about a third of a
    randomly cut batch is), while which examples meet is still random."""
    order = epoch_order(len(lengths), seed, epoch)
    if group <= 1:
        return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    span = batch_size * group
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        run = sorted(order[start:start + span], key=lambda i: lengths[i])  # stable
        batches += [run[k:k + batch_size] for k in range(0, len(run), batch_size)]
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return [batches[int(i)] for i in shuffle]


@dataclass(frozen=True, slots=True)
class Batch:
    """A padded batch and where its reply targets are.

    `rows[i], cols[i]` is the position whose next-token logits predict `targets[i]`; `first[r]`
    is the index (into those positions) of row r's first reply token. Multiple-choice rows are
    `mc_rows`, with their options' first reply tokens `option_ids` (-1 padded) and `gold`.
    """

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [N]
    cols: torch.Tensor  # [N]
    targets: torch.Tensor  # [N]
    first: torch.Tensor  # [B]
    mc_rows: torch.Tensor  # [M]
    option_ids: torch.Tensor  # [M, K]
    gold: torch.Tensor  # [M]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-padded ids and mask (real tokens keep positions 0..n-1) and the reply targets."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    first: list[int] = []
    mc_rows: list[int] = []
    # at least one column, so a batch without multiple choice is an empty [0, 1] option view
    k = max(1, *(len(e.option_ids) for e in examples))
    options: list[list[int]] = []
    gold: list[int] = []
    for r, e in enumerate(examples):
        n = len(e.ids)
        ids[r, :n] = torch.tensor(e.ids, dtype=torch.long)
        mask[r, :n] = 1
        first.append(len(targets))
        for pos in range(e.reply_start, n):
            rows.append(r)
            cols.append(pos - 1)
            targets.append(e.ids[pos])
        if e.option_ids:
            mc_rows.append(r)
            options.append(list(e.option_ids) + [-1] * (k - len(e.option_ids)))
            gold.append(e.gold)

    def long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return Batch(ids, mask, long(rows), long(cols), long(targets), long(first), long(mc_rows),
                 torch.tensor(options, dtype=torch.long).reshape(len(mc_rows), k), long(gold))
