"""Benchmark: writing a merged checkpoint (calibserve's streaming writer vs mergekit), and the
sweep's in-place point against writing and reloading a checkpoint per point.

Run: `.venv/bin/python benchmarks/merge_write_bench.py` (needs `.venv-mergekit` with
`mergekit==0.1.5` for the comparison; `--skip-mergekit` otherwise). A synthetic pair of
Llama-shaped float16 checkpoints (>= 1 GB each) is generated under `benchmarks/.work/` and deleted
at the end. Each writer runs in its own child process, measured with GNU time (wall time and
peak RSS of the child), after the inputs are dropped from the page cache (`posix_fadvise
DONTNEED`), so every run starts from disk. The disk's cold sequential read speed over the same
files is measured first: reading both parents once is the physical floor of any merge.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: benchmarks/ itself is sys.path[0]
    sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_model, loadavg, mem_gib, write_json  # noqa: E402

WORK = REPO / "benchmarks" / ".work"
MERGEKIT = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"

# ~536 M parameters: 1.07 GB per parent in float16.
SHAPE = {"hidden": 2048, "intermediate": 5504, "layers": 8, "vocab": 32000, "heads": 16,
         "kv_heads": 16}
LAMBDA = 0.3


def llama_tensors(s: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = s["hidden"], s["intermediate"], s["vocab"]
    kv = h * s["kv_heads"] // s["heads"]
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        names += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return names


def llama_config(s: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": s["hidden"], "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"],
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "float16", "hidden_act": "silu", "rope_theta": 10000.0,
    }


def make_checkpoint(path: Path, seed: int, shape: dict[str, int], shard_bytes: int) -> int:
    """A sharded float16 checkpoint written tensor by tensor (HF layout, with an index)."""
    from calibserve.merge.tensorfile import ShardLayout, write_header, write_tensor_bytes

    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = llama_tensors(shape)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in tensors:
        nbytes = 2 * int(torch.tensor(shp).prod())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        layout = ShardLayout(fname, tuple((n, "F16", s) for n, s in shard))
        with open(path / fname, "wb") as f:
            write_header(f, layout, {"format": "pt"})
            for name, shp in shard:
                t = (torch.randn(shp, generator=gen) * 0.02).to(torch.float16)
                write_tensor_bytes(f, t)
                weight_map[name] = fname
                total += t.numel() * 2
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(llama_config(shape)))
    return total


def drop_cache(paths: list[Path]) -> None:
    """Evict files from the page cache (clean pages only; fsync first so writes are clean)."""
    for p in paths:
        for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def read_speed(dirs: list[Path]) -> dict[str, float]:
    drop_cache(dirs)
    files = [f for d in dirs for f in sorted(d.glob("*.safetensors"))]
    buf = bytearray(16 * 2**20)
    total = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    dt = time.perf_counter() - t0
    return {"bytes": total, "seconds": dt, "MB_per_s": total / dt / 1e6}


def run_child(cmd: list[str], label: str) -> dict[str, float]:
    """Wall time and peak RSS of `cmd`, measured by GNU time around it.

    Not `os.wait4` on our own child: Linux starts a child's `ru_maxrss` at the high-water mark of
    the memory it was forked (or vforked) from, i.e. this benchmark's own peak. `/usr/bin/time`
    is a small process, so the child it starts begins near zero.
    """
    stats = WORK / f"time-{label.replace(' ', '-')}.txt"
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(stats), *cmd],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stderr.decode(errors='replace')[-3000:]}")
    kb, user, sys_ = stats.read_text().split()[-3:]
    return {"wall_s": wall, "peak_rss_MB": int(kb) / 1024, "user_s": float(user),
            "sys_s": float(sys_)}


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from calibserve.merge.checkpoint import open_checkpoint, plan_pair
from calibserve.merge.writer import write_model
plan = plan_pair(open_checkpoint({base!r}, "--base"), open_checkpoint({aligned!r}, "--aligned"))
write_model(plan, {lam}, "linear", Path({out!r}), shard_size=2 * 10**9, model_card="bench",
            durable={durable})
"""


def bench_calibserve(base: Path, aligned: Path, out: Path, durable: bool) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    drop_cache([base, aligned])
    code = CHILD.format(repo=str(REPO), base=str(base), aligned=str(aligned), lam=LAMBDA,
                        out=str(out), durable=durable)
    res = run_child([sys.executable, "-c", code], "calibserve writer")
    res["output_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return res


def bench_mergekit(base: Path, aligned: Path, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = WORK / "mergekit.yaml"
    cfg.write_text(
        "merge_method: linear\n"
        "dtype: float16\n"
        "models:\n"
        f"  - model: {base}\n    parameters:\n      weight: {1 - LAMBDA}\n"
        f"  - model: {aligned}\n    parameters:\n      weight: {LAMBDA}\n"
    )
    drop_cache([base, aligned])
    res = run_child([str(MERGEKIT), str(cfg), str(out), "--no-copy-tokenizer", "--quiet"],
                    "mergekit")
    res["output_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return res


def compare_outputs(a: Path, b: Path) -> float:
    """Largest absolute difference between the two merged checkpoints (float16 rounding)."""
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        m: dict[str, Path] = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                m.update({k: f for k in fh.keys()})  # noqa: SIM118 - safe_open has no __iter__
        return m

    ia, ib = index(a), index(b)
    assert set(ia) == set(ib), "different tensor names"
    worst = 0.0
    for name in sorted(ia):
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            ta, tb = fa.get_tensor(name).float(), fb.get_tensor(name).float()
        worst = max(worst, float((ta - tb).abs().max()))
    return worst


def bench_sweep_point(base: Path, aligned: Path, out: Path, points: int = 2) -> dict[str, float]:
    """In-place set of every weight vs write_model + from_pretrained, per point (float16)."""
    from transformers import AutoModelForCausalLM

    from calibserve.merge.checkpoint import open_checkpoint, plan_pair
    from calibserve.merge.model import load_eval_model
    from calibserve.merge.writer import write_model

    plan = plan_pair(open_checkpoint(str(base), "--base"),
                     open_checkpoint(str(aligned), "--aligned"))
    t0 = time.perf_counter()
    em = load_eval_model(plan, "linear", torch.float16, "cpu")
    load = time.perf_counter() - t0
    lams = [0.1 * (k + 1) for k in range(points)]
    t0 = time.perf_counter()
    for lam in lams:
        em.set(lam)
    in_place = (time.perf_counter() - t0) / points
    del em
    t0 = time.perf_counter()
    for lam in lams:
        shutil.rmtree(out, ignore_errors=True)
        write_model(plan, lam, "linear", out, 2 * 10**9, "bench", durable=False)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
        del model
    reload = (time.perf_counter() - t0) / points
    shutil.rmtree(out, ignore_errors=True)
    return {"load_both_parents_s": load, "in_place_set_s": in_place,
            "write_and_reload_s": reload}


def machine() -> dict[str, Any]:
    import platform

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "platform": platform.platform(), "cpu": cpu_model(),
            "mem_GiB": mem_gib(), "load_avg_at_start": loadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep benchmarks/.work")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    usage = shutil.disk_usage(REPO)
    if usage.free < 8 * 10**9:
        raise SystemExit(f"need 8 GB free under {REPO}, have {usage.free / 1e9:.1f} GB")
    WORK.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "shape": SHAPE, "lambda": LAMBDA}
    try:
        base, aligned = WORK / "base", WORK / "aligned"
        t0 = time.perf_counter()
        results["parent_bytes"] = make_checkpoint(base, 1, SHAPE, 10**9)
        make_checkpoint(aligned, 2, SHAPE, 10**9)
        results["generate_s"] = time.perf_counter() - t0
        results["disk_read"] = read_speed([base, aligned])
        print("disk read:", results["disk_read"], flush=True)
        results["calibserve"] = bench_calibserve(base, aligned, WORK / "out-calibserve", True)
        print("calibserve (fsync):", results["calibserve"], flush=True)
        results["calibserve_no_fsync"] = bench_calibserve(base, aligned, WORK / "out-nofsync",
                                                          False)
        print("calibserve (no fsync):", results["calibserve_no_fsync"], flush=True)
        shutil.rmtree(WORK / "out-nofsync", ignore_errors=True)
        if not args.skip_mergekit:
            if not MERGEKIT.exists():
                raise SystemExit(f"{MERGEKIT} not found: pip install mergekit==0.1.5 there")
            results["mergekit"] = bench_mergekit(base, aligned, WORK / "out-mergekit")
            print("mergekit:", results["mergekit"], flush=True)
            results["max_abs_diff_vs_mergekit"] = compare_outputs(WORK / "out-calibserve",
                                                                  WORK / "out-mergekit")
            shutil.rmtree(WORK / "out-mergekit", ignore_errors=True)
        if not args.skip_sweep:
            results["sweep_point"] = bench_sweep_point(base, aligned, WORK / "out-sweep")
            print("sweep point:", results["sweep_point"], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
