"""Tuning helper for the base's format SFT: pretrains the base once (bit-identical to a build of
the default settings), then for each variant runs the format SFT and the aligned SFT from the same
generator state and prints one JSON line: base and aligned accuracy / ECE on the MC `test` split,
the gap check, and both models' open-question numbers.

    python demo/tuning/tune_format.py SEED VARIANTS_JSON

A variant is a partial SFTSettings for the format SFT plus `open` and `mc` (chat open and
multiple-choice questions per QA fact, answers in the facts' proportions; default: the
settings'), e.g. '[{"epochs": 2, "mc": 0}, {"epochs": 2, "lr": 0.0003, "mc": 0}, {"mc": 2}]'.
Results of the version-7 trials: demo/tuning/trials.md.
"""

import copy
import json
import sys
import time

import torch

from calibserve.demo.build import _torch_state, make_materials
from calibserve.demo.corpus import base_format_examples
from calibserve.demo.evaluate import mc_metrics, option_probs, short_metrics
from calibserve.demo.settings import DemoSettings, SFTSettings
from calibserve.demo.train import make_model, pretrain, sft

seed = int(sys.argv[1])
variants = json.loads(sys.argv[2])
settings = DemoSettings()
mat = make_materials(settings, seed)
tok, splits = mat.tokenizer, mat.splits


def mc(model):
    r = mc_metrics(option_probs(model, tok, splits["test"]), splits["test"])
    return {k: round(v, 3) for k, v in r.items() if k in ("accuracy", "ece")}


def short(model):
    r = short_metrics(model, tok, mat.short["test"])
    return {k: round(v, 3) for k, v in r.items() if k in ("accuracy", "ece", "answers_a_value")}


def format_ids(open_per_fact, mc_per_fact):
    ws = settings.world.model_copy(update={"base_format_per_fact": open_per_fact,
                                           "base_format_mc_per_fact": mc_per_fact})
    return [list(tok.encode(t, add_special_tokens=False))
            for t in base_format_examples(mat.world, ws)]


t0 = time.monotonic()
with _torch_state(settings.threads):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pretrained = make_model(settings.model, len(tok), mat.pad_id, mat.eos_id)
    pretrain(pretrained, mat.base_doc_ids, mat.eos_id, settings.pretrain, gen)
    state = gen.get_state()
    print(json.dumps({"seed": seed, "pretrained": mc(pretrained),
                      "pretrain_s": round(time.monotonic() - t0)}), flush=True)
    for variant in variants:
        v = dict(variant)
        open_n = v.pop("open", settings.world.base_format_per_fact)
        mc_n = v.pop("mc", settings.world.base_format_mc_per_fact)
        default = settings.base_format_sft or SFTSettings()
        fmt = SFTSettings.model_validate({**default.model_dump(), **v})
        gen.set_state(state)
        base = copy.deepcopy(pretrained)
        sft(base, format_ids(open_n, mc_n), mat.pad_id, fmt, gen)
        aligned = copy.deepcopy(base)
        sft(aligned, mat.sft_ids, mat.pad_id, settings.sft, gen)
        mb, ma = mc(base), mc(aligned)
        print(json.dumps({
            "seed": seed, "variant": variant, "base": mb, "aligned": ma,
            "ratio": round(ma["ece"] / mb["ece"], 2),
            "pass": ma["accuracy"] >= mb["accuracy"] and ma["ece"] >= 1.5 * mb["ece"],
            "base_short": short(base), "aligned_short": short(aligned),
        }), flush=True)
