"""Instruction-tune Gemma 3 270M (the pretrained base) into the `aligned` half of a real merge pair
(issue 13 item 3). Meant for a GPU; `--max-steps 2` checks it end to end on a CPU.

    .venv/bin/python -m benchmarks.realworld.instruct_tune                     # the recipe (GPU)
    .venv/bin/python -m benchmarks.realworld.instruct_tune --max-steps 2 --out /tmp/g  # CPU check

Recipe (full fine-tuning with transformers' `Trainer`, one run, seeded):

- Chat template: Gemma's turn format (`<start_of_turn>user`, newline, the message,
  `<end_of_turn>`, then `<start_of_turn>model`; tokens already in the base vocabulary; BOS first),
  written into the aligned checkpoint as
  `chat_template.jinja`; the tokenizer is otherwise the base one, id for id (merge requires it).
- Supervised answers, loss on the reply tokens only (prompt tokens are masked out):
  multiple choice in the wording calibserve evaluates and serves (`merge.evaluate.format_mc_prompt`)
  answered by the gold letter; short answers (a sentence stem) answered by the gold continuation.
- Training items never appear in the eval splits: the merge and calibration of this pair run on
  MMLU (`realworld/data/mmlu`), and training uses other tasks only: BIG-bench social_iqa and
  strategyqa (all their splits: multiple choice, 3 and 2 options) and qa_wikidata's `select` split
  (short answers; its calibrate/test splits stay held out for the free-form methods). The script
  checks that no training question text equals an MMLU question and stops if one does.
- Optimiser: AdamW, lr 2e-5, cosine schedule with 3% warm-up, weight decay 0, batch 16, one epoch
  (8,278 items, 518 steps), max length 256 tokens; bf16 on a GPU, float32 on a CPU; seed 0.

Cost: one epoch is 8,278 sequences of about 40-80 tokens, about 1,100 tokens a step. Gemma 3 270M
has about 100 M non-embedding parameters and a 262,144 x 640 tied embedding, so a step is about
6 x 100 M x 1,100 (layers, forward and backward) + 3 x 2 x 168 M x 1,100 (the logits) = 1.8 TFLOP:
about a minute a step at the few tens of GFLOP/s this 2-core CPU sustains (8-9 hours for the
epoch: not run here), well under a second on one H200 in bf16 (a few minutes with loading and
saving). CPU runs with `--max-steps` only check the script end to end. The output is a Hugging
Face checkpoint (float32 safetensors, tokenizer, chat template, `train_info.json` with the recipe
and its measured time) that `calibserve merge` loads as `--aligned`; it is written to a temporary
directory and renamed into place when complete.

Follow-up, the real pair (see the README section "On real models"):

    calibserve merge --base $CALIBSERVE_HOME/realworld/models/gemma-3-270m \\
        --aligned $CALIBSERVE_HOME/realworld/models/gemma-3-270m-instruct \\
        --data $CALIBSERVE_HOME/realworld/data/mmlu --out OUT --device cuda --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if role == 'system' %}{% set role = 'user' %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
END_OF_TURN = "<end_of_turn>"
BASE_NAME = "gemma-3-270m"
ALIGNED_NAME = "gemma-3-270m-instruct"
MC_TRAIN_TASKS = ("social_iqa", "strategyqa")
SHORT_TRAIN = ("qa_wikidata", "select")
EVAL_TASK = "mmlu"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def training_pairs(data: Path, seed: int) -> list[tuple[str, str]]:
    """(user message, reply) pairs from the training tasks, shuffled; none is an eval question."""
    from calibserve.merge.evaluate import LETTERS, format_mc_prompt

    pairs: list[tuple[str, str]] = []
    for task in MC_TRAIN_TASKS:
        for split in ("select", "calibrate", "test"):
            for item in read_jsonl(data / task / f"{split}.jsonl"):
                pairs.append((format_mc_prompt(item), LETTERS[int(item["answer"])]))
    task, split = SHORT_TRAIN
    for item in read_jsonl(data / task / f"{split}.jsonl"):
        pairs.append((str(item["question"]), str(item["answer"])))
    eval_questions = {str(it["question"]).strip()
                      for split in ("select", "calibrate", "test")
                      for it in read_jsonl(data / EVAL_TASK / f"{split}.jsonl")}
    leaked = [q for q, _ in pairs if q.split(" A ")[0].removeprefix("question : ").strip()
              in eval_questions]
    if leaked:
        sys.exit(f"error: {len(leaked)} training questions are MMLU eval questions, e.g. "
                 f"{leaked[0][:80]!r}")
    random.Random(seed).shuffle(pairs)
    return pairs


class SFTData:
    """Tokenized (prompt, reply) pairs; labels are -100 on the prompt (loss on the reply only)."""

    def __init__(self, tokenizer: Any, pairs: Sequence[tuple[str, str]], max_len: int) -> None:
        self.rows: list[tuple[list[int], list[int]]] = []
        for prompt, reply in pairs:
            head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, tokenize=False)
            ids_p = tokenizer(head, add_special_tokens=False)["input_ids"]
            ids_r = tokenizer(reply + END_OF_TURN + "\n", add_special_tokens=False)["input_ids"]
            ids = (ids_p + ids_r)[:max_len]
            labels = ([-100] * len(ids_p) + ids_r)[:max_len]
            self.rows.append((ids, labels))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.rows[i]
        return {"input_ids": ids, "labels": labels}


def collate(pad_id: int) -> Any:
    import torch

    def fn(batch: Sequence[Mapping[str, list[int]]]) -> dict[str, Any]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[r, :n] = torch.tensor(b["input_ids"])
            labels[r, :n] = torch.tensor(b["labels"])
            mask[r, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return fn


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    home = Path(os.environ.get("CALIBSERVE_HOME", ".calibserve")) / "realworld"
    p.add_argument("--base", type=Path, default=home / "models" / BASE_NAME)
    p.add_argument("--data", type=Path, default=home / "data")
    p.add_argument("--out", type=Path, default=home / "models" / ALIGNED_NAME)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after N steps (-1: one epoch)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    if not (args.base / "config.json").is_file():
        p.error(f"--base: {args.base} is not a checkpoint (run `python -m "
                "benchmarks.realworld.fetch --only gemma3,data` first)")
    if args.out.exists() and not args.overwrite:
        p.error(f"--out: {args.out} exists (pass --overwrite to replace it)")
    for task in (*MC_TRAIN_TASKS, SHORT_TRAIN[0], EVAL_TASK):
        if not (args.data / task).is_dir():
            p.error(f"--data: {args.data} has no {task}/ (run benchmarks.realworld.fetch)")

    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    pairs = training_pairs(args.data, args.seed)
    data = SFTData(tokenizer, pairs, args.max_len)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.tmp-", dir=args.out.parent))
    try:
        targs = TrainingArguments(
            output_dir=str(tmp / "trainer"), per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.03,  # float: ratio
            weight_decay=0.0, num_train_epochs=1, max_steps=args.max_steps,
            bf16=cuda, use_cpu=not cuda, logging_steps=10, save_strategy="no",
            report_to=[], seed=args.seed, remove_unused_columns=False,
            dataloader_num_workers=0,
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        trainer = Trainer(model=model, args=targs, train_dataset=data,  # type: ignore[arg-type]
                          data_collator=collate(int(pad)))
        t0 = time.monotonic()
        result = trainer.train()
        seconds = time.monotonic() - t0
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.to(torch.float32).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "base": str(args.base), "recipe": {
                "train_tasks": [*(f"{t}: select+calibrate+test" for t in MC_TRAIN_TASKS),
                                f"{SHORT_TRAIN[0]}: {SHORT_TRAIN[1]}"],
                "eval_task_kept_out": EVAL_TASK, "items": len(data), "lr": args.lr,
                "batch_size": args.batch_size, "max_len": args.max_len, "epochs": 1,
                "max_steps": args.max_steps, "seed": args.seed, "loss": "reply tokens only",
            },
            "steps": int(result.global_step), "train_loss": float(result.training_loss),
            "train_seconds": round(seconds, 1), "device": "cuda" if cuda else "cpu",
            "complete_epoch": args.max_steps < 0,
        }
        (tmp / "train_info.json").write_text(json.dumps(info, indent=1))
        if args.out.exists():
            shutil.rmtree(args.out)
        tmp.rename(args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{args.out}: {info['steps']} steps, train loss {info['train_loss']:.3f}, "
          f"{seconds:.0f} s on {info['device']}")


if __name__ == "__main__":
    main()
