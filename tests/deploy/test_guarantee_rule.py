"""The certified-threshold alerts (CalibserveGuaranteeUnverified on the live upper bound,
CalibserveGuaranteeBroken on the lower): their promtool unit test passes, and fails on a rules
file that drops the kept-answers floor, compares against another replica's target, or pages on
the upper bound as if it were the lower (negative controls: the unit test can tell)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.deploy.test_prometheus_rules import promtool
from tests.deploy.tools import RULES, run

TEST_FILE = RULES.parent / "tests" / "guarantee_test.yml"


def _run_with(rules_text: str, tmp_path: Path) -> str:
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules.yml").write_text(rules_text)
    shutil.copy(TEST_FILE, tmp_path / "tests" / TEST_FILE.name)
    result = run([promtool(), "test", "rules", str(tmp_path / "tests" / TEST_FILE.name)])
    return ("ok" if result.returncode == 0 else "failed") + result.stdout + result.stderr


def test_the_unit_test_passes() -> None:
    result = run([promtool(), "test", "rules", str(TEST_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dropping_the_floor_pages_on_fifty_answers(tmp_path: Path) -> None:
    text = RULES.read_text()
    floor = "\n          and on (instance, model, method) calibserve_guarantee_kept_answers >= 100"
    assert text.count(floor) == 2
    out = _run_with(text.replace(floor, ""), tmp_path)
    assert out.startswith("failed") and "bounds on few kept answers never page" in out


def test_ignoring_the_instance_compares_with_another_replicas_target(tmp_path: Path) -> None:
    text = RULES.read_text()
    match = "> on (instance, model, method) calibserve_guarantee_max_error"
    assert text.count(match) == 2
    # Against the smallest target of any replica: replica b (0.3) is judged by a's 0.2.
    broken = text.replace(match, "> on (model, method) group_left "
                                 "min by (model, method) (calibserve_guarantee_max_error)")
    out = _run_with(broken, tmp_path)
    assert out.startswith("failed"), out


def test_paging_on_the_upper_bound_is_caught(tmp_path: Path) -> None:
    text = RULES.read_text()
    lower = "calibserve_guarantee_kept_error_lower_bound\n            > on"
    assert text.count(lower) == 1
    out = _run_with(text.replace(lower, "calibserve_guarantee_kept_error_bound\n            > on"),
                    tmp_path)
    assert out.startswith("failed"), out
