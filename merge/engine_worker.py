"""The vLLM worker extension that sets a merge's weights in place, on every worker.

vLLM mixes this class into each of its workers (`LLM(worker_extension_cls=...)`); the driver
calls its methods through `LLM.collective_rpc`, so with tensor parallelism every rank runs them.

Why it exists, and why it reloads rather than writes parameters: vLLM's kernels do not always
read the parameter tensors a checkpoint is loaded into. On CPU, `process_weights_after_loading`
packs every linear weight into a oneDNN or sgl-kernel handle and empties the parameter, so a
write into `named_parameters()` would change nothing the engine computes. vLLM's own in-place
reload (`model_runner.reload_weights(weights_iterator, is_checkpoint_format=True)`) feeds
checkpoint-format tensors through the model's `load_weights`, which fuses (qkv, gate/up),
renames and shards them for this rank exactly as the first load did, and then re-runs each
layer's weight processing (repacking) into the same kernel storage. Each lambda is therefore set
by feeding theta(lambda) of every checkpoint tensor through that path.

Memory: the parents are not copied into each worker. Every tensor is read from the parents'
safetensors files (memory-mapped: the OS page cache holds them once per node, shared by all
ranks), interpolated one tensor at a time as the checkpoint writer does (`merge.interpolate` in
`writer.compute_dtype`, cast to the stored dtype: bit for bit the weights that are written),
handed to the loader, and dropped; each device holds its own shard of the live model plus one
tensor's scratch.

Every set is checked: the loader must report every model parameter loaded, and the names fed
must be exactly the plan's tensors; the fingerprint of what was fed (float64 sum per tensor) is
returned so the driver can compare it with its own computation from the files.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["InterpolationExtension", "tensor_fingerprint"]


def tensor_fingerprint(t: torch.Tensor) -> tuple[float, float]:
    """(sum, sum of squares) in float64: two numbers that move when any element moves."""
    x = t.detach().reshape(-1).to(torch.float64)
    return float(x.sum()), float((x * x).sum())


def _release_freed_memory() -> None:
    """Return what a reload freed to the OS: every set allocates and frees tensor-sized buffers
    (the embedding's are hundreds of MB), and glibc keeps freed blocks in its arenas, so without
    this a worker's footprint grows with every lambda (a Gemma 3 270M worker was killed by the
    OOM killer at 8.5 GB on this 24 GB machine shared with other jobs)."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class InterpolationExtension:
    """Methods vLLM adds to its worker class (prefixed `calibserve_` to avoid clashes)."""

    def calibserve_open_pair(self, base: str, aligned: str, method: str) -> int:
        """Plan the pair on this worker (reads headers only); returns the tensor count."""
        from calibserve.merge.checkpoint import open_checkpoint, plan_pair

        plan = plan_pair(open_checkpoint(base, "--base"), open_checkpoint(aligned, "--aligned"))
        self._calibserve_plan = plan
        self._calibserve_method = method
        self._calibserve_fault: str | None = None
        self._calibserve_slerp: dict[str, Any] = {}
        return len(plan.tensors)

    def calibserve_inject_fault(self, name: str | None) -> None:
        """Tests only: feed the aligned tensor for `name` whatever lambda is asked (a wrong
        tensor the check must catch)."""
        self._calibserve_fault = name

    def _calibserve_tensors(self, lam: float) -> Iterator[tuple[str, torch.Tensor]]:
        from calibserve.merge.interpolate import interpolate_into, slerp_stats
        from calibserve.merge.model import read_parent
        from calibserve.merge.writer import compute_dtype

        plan = self._calibserve_plan
        method = self._calibserve_method
        for t in plan.tensors:
            b = read_parent(t, "aligned")
            if not t.interpolated or t.name == self._calibserve_fault:
                yield t.name, b
                continue
            # As the writer: computed in float32 (float64), cast to the stored dtype.
            cd = compute_dtype(t)
            a, b32 = read_parent(t, "base").to(cd), b.to(cd)
            stats = None
            if method == "slerp":
                if t.name not in self._calibserve_slerp:
                    self._calibserve_slerp[t.name] = slerp_stats(a, b32)
                stats = self._calibserve_slerp[t.name]
            # Into `a` (elementwise, so aliasing is safe): one tensor-sized buffer fewer.
            out = interpolate_into(a, a, b32, lam, method, stats)  # type: ignore[arg-type]
            del b, b32
            yield t.name, out.to(t.aligned.torch_dtype)

    @torch.no_grad()
    def calibserve_set_lambda(self, lam: float) -> dict[str, Any]:
        """Set every weight to theta(lam) through vLLM's in-place reload; returns what was fed
        (name -> fingerprint) and the model parameters the loader did not report loaded."""
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        runner: Any = self.model_runner  # type: ignore[attr-defined]
        model = runner.get_model()
        fed: dict[str, tuple[float, float]] = {}

        def feed() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in self._calibserve_tensors(lam):
                fed[name] = tensor_fingerprint(tensor)
                yield name, tensor

        want = {name for name, _ in model.named_parameters()}
        initialize_layerwise_reload(model)
        loaded = model.load_weights(feed())
        finalize_layerwise_reload(model, runner.vllm_config.model_config)  # type: ignore[no-untyped-call]
        for reset in ("reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()
        missing = sorted(want - set(loaded)) if loaded is not None else []
        _release_freed_memory()
        return {"fed": fed, "not_loaded": missing}
