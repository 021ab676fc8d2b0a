"""Tuning helper: reproduces demo.build._build_into up to the aligned model (bit-identical for the
same settings/seed), pretrains the base once, then tries several SFT settings from the same
generator state. Usage: python tune.py SEED SETTINGS_JSON SFT_LIST_JSON [TAG]
(SETTINGS_JSON: a partial DemoSettings, e.g. '{"world": {"qa_chat_fraction": 0.05}}')"""

import copy
import json
import sys
import time

import numpy as np
import torch

from demo.build import _torch_state
from demo.chat import ANSWER_PREFIX, LETTERS, format_mc_prompt
from demo.corpus import (
    eval_splits,
    open_prompts,
    pretraining_documents,
    sft_examples,
    short_answer_items,
)
from demo.evaluate import mc_metrics, option_probs
from demo.settings import DemoSettings, SFTSettings
from demo.tokenizer import build_tokenizer
from demo.train import make_model, pretrain, sft
from demo.world import make_world

seed = int(sys.argv[1])
over = json.loads(sys.argv[2])
sfts = json.loads(sys.argv[3])
tag = sys.argv[4] if len(sys.argv) > 4 else ""
settings = DemoSettings.model_validate(over)
t0 = time.monotonic()
rng = np.random.default_rng(seed)
ws = settings.world
world = make_world(ws, rng)
docs = pretraining_documents(world, ws, rng)
sft_texts = sft_examples(world, ws, rng)
splits = eval_splits(world, ws, rng)
short = short_answer_items(world, rng)
prompts = open_prompts(world, ws)
vocab_texts = [*docs, *sft_texts, ANSWER_PREFIX, " ".join(LETTERS)]
vocab_texts += [format_mc_prompt(item) for items in splits.values() for item in items]
vocab_texts += [f"{s['question']} {s['answer']}" for s in short]
vocab_texts += [p["prompt"] for p in prompts]
tok = build_tokenizer(vocab_texts)
pad_id, eos_id = int(tok.pad_token_id), int(tok.eos_token_id)
def enc(t):
    return list(tok.encode(t, add_special_tokens=False))
doc_ids = [enc(d) for d in docs]
sft_ids = [enc(t) for t in sft_texts]


def m(model):
    r = mc_metrics(option_probs(model, tok, splits["test"]), splits["test"])
    return {k: round(v, 4) for k, v in r.items() if k != "n"}


with _torch_state(settings.threads):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = make_model(settings.model, len(tok), pad_id, eos_id)
    pretrain(base, doc_ids, eos_id, settings.pretrain, gen)
    st = gen.get_state()
    mb = m(base)
    tp = time.monotonic() - t0
    print(
        json.dumps({"tag": tag, "seed": seed, "over": over, "base": mb, "pretrain_s": round(tp)}),
        flush=True,
    )
    for s in sfts:
        t1 = time.monotonic()
        gen.set_state(st)
        al = copy.deepcopy(base)
        sft(
            al, sft_ids, pad_id, SFTSettings.model_validate({**settings.sft.model_dump(), **s}), gen
        )
        ma = m(al)
        ok = ma["accuracy"] >= mb["accuracy"] and ma["ece"] >= 1.5 * mb["ece"]
        line = {
            "tag": tag,
            "seed": seed,
            "over": over,
            "sft": s,
            "base": mb,
            "aligned": ma,
            "ratio": round(ma["ece"] / mb["ece"], 2),
            "dacc": round(ma["accuracy"] - mb["accuracy"], 4),
            "pass": ok,
            "sft_s": round(time.monotonic() - t1),
        }
        print(json.dumps(line), flush=True)
        with open("/tmp/tune/results.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")
