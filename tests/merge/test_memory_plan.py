"""`calibserve merge --dry-run`: the memory plan from configs alone, and the refusal of a run
whose plan cannot fit, naming the flag to change.

`configs/gemma-3-27b/config.json` is Gemma-3-27B's published config.json (google/gemma-3-27b-it);
its text_config gains `vocab_size: 262208`, the value transformers' Gemma3TextConfig fills in,
because the published file leaves it to that default. No weights: the plan must not need them.
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from calibserve.merge.cli import app
from calibserve.merge.memory_plan import estimate_params, model_size

runner = CliRunner()
GEMMA_27B = Path(__file__).parent / "configs" / "gemma-3-27b"


def _args(world: dict[str, Path], base: Path, aligned: Path, out: Path, *extra: str) -> list[str]:
    return ["--base", str(base), "--aligned", str(aligned), "--data", str(world["data"]),
            "--out", str(out), *extra]


def test_the_config_estimate_counts_what_a_checkpoint_holds(tiny_world: dict[str, Path]) -> None:
    """The estimator, checked against a real checkpoint's safetensors headers."""
    from_headers = model_size(str(tiny_world["aligned"]))
    assert from_headers.source == "safetensors headers"
    cfg = json.loads((tiny_world["aligned"] / "config.json").read_text())
    assert estimate_params(cfg).params == from_headers.params


def test_gemma_3_27b_is_sized_from_its_config_alone() -> None:
    size = model_size(str(GEMMA_27B))
    assert size.source == "config.json"
    assert 27.0e9 < size.params < 27.8e9  # Google reports 27.4 B (text and vision tower)


def test_gemma_3_27b_at_tp_2_in_bfloat16_fits_80_gb_and_says_so(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, _args(tiny_world, GEMMA_27B, GEMMA_27B, out, "--dry-run",
                                      "--evaluator", "vllm", "--tensor-parallel-size", "2",
                                      "--dtype", "bfloat16", "--device-memory", "80GB"))
    assert result.exit_code == 0, result.output
    rows = {tuple(line.split()[:2]): line for line in result.output.splitlines()
            if line.startswith(("vllm", "transformers"))}
    assert rows[("vllm", "2")].endswith("yes  <- this run")
    assert " no" in rows[("transformers", "1")]  # three copies of 55 GB do not fit
    assert " no" in rows[("vllm", "1")]
    assert "vllm at tensor parallelism 2" in result.output and ": fits" in result.output
    assert not out.exists()  # a dry run writes nothing


def test_a_run_that_cannot_fit_is_refused_naming_the_flag(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    base = _args(tiny_world, GEMMA_27B, GEMMA_27B, out, "--evaluator", "vllm", "--dtype",
                 "bfloat16", "--device-memory", "80GB")
    result = runner.invoke(app, base)
    assert result.exit_code == 2
    assert "Invalid value for '--tensor-parallel-size'" in result.output
    assert "does not fit" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_the_transformers_evaluator_is_refused_tensor_parallelism(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    result = runner.invoke(app, _args(tiny_world, tiny_world["base"], tiny_world["aligned"],
                                      tmp_path / "o", "--evaluator", "transformers",
                                      "--tensor-parallel-size", "2"))
    assert result.exit_code == 2
    assert "Invalid value for '--tensor-parallel-size'" in result.output


def test_a_bad_device_memory_is_refused_naming_it(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    result = runner.invoke(app, _args(tiny_world, tiny_world["base"], tiny_world["aligned"],
                                      tmp_path / "o", "--dry-run", "--device-memory", "lots"))
    assert result.exit_code == 2
    assert "Invalid value for '--device-memory'" in result.output


def test_pipeline_stages_divide_the_plan_across_nodes(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    """Two nodes of one 80 GB GPU each: 27B does not fit one stage (91 GB), it fits two."""
    def plan(*extra: str) -> str:
        result = runner.invoke(app, _args(tiny_world, GEMMA_27B, GEMMA_27B, tmp_path / "o",
                                          "--dry-run", "--evaluator", "vllm", "--dtype",
                                          "bfloat16", "--device-memory", "80GB", *extra))
        assert result.exit_code == 0, result.output
        return result.output

    one, two = plan(), plan("--pipeline-parallel-size", "2")
    row = {out: next(line for line in out.splitlines() if line.endswith("<- this run"))
           for out in (one, two)}
    assert row[one].split()[:3] == ["vllm", "1", "1"] and " no " in row[one]
    assert row[two].split()[:3] == ["vllm", "1", "2"] and " yes " in row[two]
    weights = {out: float(row[out].split()[3]) for out in (one, two)}
    assert abs(weights[two] - weights[one] / 2) < 0.1  # GB: half the layers a stage
    assert "vllm at tensor parallelism 1 and 2 pipeline stages" in two and ": fits" in two


def test_the_transformers_evaluator_refuses_the_multi_node_flags(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    for extra, flag in ((["--pipeline-parallel-size", "2"], "--pipeline-parallel-size"),
                        (["--distributed-executor-backend", "ray"],
                         "--distributed-executor-backend")):
        result = runner.invoke(app, _args(tiny_world, tiny_world["base"], tiny_world["aligned"],
                                          tmp_path / "o", "--evaluator", "transformers", *extra))
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '{flag}'" in result.output
    assert not (tmp_path / "o").exists()
