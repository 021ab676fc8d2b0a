"""Settings: grid and size parsing, and refusals that name the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibserve.merge.config import (
    DEFAULT_GRID,
    build_config,
    parse_grid,
    parse_select,
    parse_size,
)
from calibserve.merge.errors import InvalidConfig


def test_default_grid_is_zero_to_one_step_tenth() -> None:
    assert list(DEFAULT_GRID) == [round(i / 10, 6) for i in range(11)]
    assert parse_grid("0:1:0.1") == list(DEFAULT_GRID)


def test_grid_lists_ranges_and_extrapolation() -> None:
    assert parse_grid("0, 0.5,1") == [0.0, 0.5, 1.0]
    assert parse_grid("0:0.4:0.2,1.2,1.5") == [0.0, 0.2, 0.4, 1.2, 1.5]
    assert parse_grid("0.3:0.3:0.1") == [0.3]
    assert 0.3 in parse_grid("0:1:0.1")  # not 0.30000000000000004
    assert parse_grid("1,0,1") == [0.0, 1.0]


@pytest.mark.parametrize(
    "spec", ["", "a,b", "0:1", "1:0:0.1", "0:1:0", "0:1:-1", "nan", "9", "0:100:0.001"]
)
def test_bad_grids_are_refused_naming_the_flag(spec: str) -> None:
    with pytest.raises(InvalidConfig) as err:
        parse_grid(spec)
    assert err.value.param == "--grid"


def test_sizes() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size(4096) == 4096
    for bad in ("lots", "5XB", "10"):
        with pytest.raises(InvalidConfig):
            parse_size(bad)


def test_build_config_maps_errors_to_flags(tmp_path: Path) -> None:
    common = {"base": "b", "aligned": "a", "data": tmp_path, "out": tmp_path / "o"}
    cfg = build_config(**common)
    assert cfg.grid == list(DEFAULT_GRID) and cfg.method == "linear"
    cases = {
        "--grid": {"grid": "x"},
        "--tolerance": {"tolerance": -1.0},
        "--select": {"select": "best"},
        "--shard-size": {"shard_size": "huge"},
        "--target-accuracy": {"target_accuracy": [1.5]},
        "--batch-size": {"batch_size": 0},
        "--device": {"device": "tpu"},
        "--grader": {"grader": "fuzzy"},
        "--max-new-tokens": {"max_new_tokens": 0},
    }
    for flag, kw in cases.items():
        with pytest.raises(InvalidConfig) as err:
            build_config(**common, **kw)
        assert err.value.param == flag, (flag, err.value)


def test_select_names_a_rule_and_optionally_its_objective(tmp_path: Path) -> None:
    assert parse_select("knee") == ("multiple-choice", "knee")
    assert parse_select("free-form:min-ece") == ("free-form", "min-ece")
    assert parse_select("combined") == ("combined", "max-accuracy")
    common = {"base": "b", "aligned": "a", "data": tmp_path, "out": tmp_path / "o"}
    cfg = build_config(**common, select="combined:min-ece-at-accuracy")
    assert (cfg.objective, cfg.select) == ("combined", "min-ece-at-accuracy")
    assert cfg.selection == "combined:min-ece-at-accuracy"
    plain = build_config(**common, select="knee")
    assert (plain.objective, plain.select, plain.selection) == ("multiple-choice", "knee", "knee")
    assert build_config(**common, objective="free-form").selection == "free-form:max-accuracy"
    for bad in ("free:knee", "free-form:best", "free-form:", "a:b:c"):
        with pytest.raises(InvalidConfig) as err:
            build_config(**common, select=bad)
        assert err.value.param == "--select", bad
    with pytest.raises(InvalidConfig) as err:
        build_config(**common, select="free-form:knee", objective="combined")
    assert err.value.param == "--select"


def test_graders_by_short_name_or_module_function(tmp_path: Path) -> None:
    common = {"base": "b", "aligned": "a", "data": tmp_path, "out": tmp_path / "o"}
    assert build_config(**common).grader == "exact"
    assert build_config(**common, grader="contains").grader == "contains"
    spec = "calibserve.calibration.answers:exact_match"
    assert build_config(**common, grader=spec).grader == spec
    for bad in ("calibserve.calibration.answers:nope", "no.such.module:f", "fuzzy"):
        with pytest.raises(InvalidConfig) as err:
            build_config(**common, grader=bad)
        assert err.value.param == "--grader" and bad in err.value.message
