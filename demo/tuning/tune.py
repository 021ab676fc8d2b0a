"""Tuning helper: reproduces demo.build._build_into up to the aligned model (bit-identical for the
same settings/seed), pretrains the base once, then tries several SFT settings from the same
generator state. Usage: python tune.py SEED SETTINGS_JSON SFT_LIST_JSON [TAG]
(SETTINGS_JSON: a partial DemoSettings, e.g. '{"world": {"qa_chat_fraction": 0.05}}')"""

import copy
import json
import sys
import time

import torch

from calibserve.demo.build import _torch_state, make_materials
from calibserve.demo.evaluate import mc_metrics, option_probs
from calibserve.demo.settings import DemoSettings, SFTSettings
from calibserve.demo.train import make_model, pretrain, sft

seed = int(sys.argv[1])
over = json.loads(sys.argv[2])
sfts = json.loads(sys.argv[3])
tag = sys.argv[4] if len(sys.argv) > 4 else ""
settings = DemoSettings.model_validate(over)
t0 = time.monotonic()
mat = make_materials(settings, seed)
tok, splits, doc_ids, sft_ids = mat.tokenizer, mat.splits, mat.base_doc_ids, mat.sft_ids
pad_id, eos_id = mat.pad_id, mat.eos_id

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
