"""The garbage collector set for serving: the start-up heap frozen, young collections rarer.

Measured (benchmarks/proxy_cpu.py --tokens 32 --gc in front of the FAKE upstream, 16 connections;
RESULTS.md "garbage collection"): with CPython's defaults a third of calibserve's CPU per
option-letter request went to the cyclic garbage collector. Every answer with 5 alternatives on
each of 32 tokens allocates about a thousand objects, so 16 answers in flight crossed the young
generation's threshold (700) every request, and each full collection walked the 80,000 objects
that importing FastAPI, pydantic, vLLM's client types and the calibration maps had left. Those
objects live as long as the process.

`settle_heap`, once the server has started, does what vLLM's own API server does after its
start-up (`vllm.utils.gc_utils.freeze_gc_heap`): collect, then `gc.freeze()` the survivors so no
later collection walks them. It also raises the young generation's threshold to
`YOUNG_THRESHOLD`: nearly all of a request's objects are freed by reference counting when the
request ends, so the collector then rarely runs at all, and the cyclic garbage it leaves
between runs is bounded by that threshold (a few MB at most).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Collect, freeze what survived start-up, and make young collections rarer."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)
