"""Package-level contracts: the names docs/internals.md promises, numpy-only imports, errors."""

from __future__ import annotations

import subprocess
import sys

import calibserve.calibration as calibration
from calibserve.calibration import CalibrationError, DegenerateDataError, NoOptionTokensError

# Exactly the names listed under "calibration/" in docs/internals.md.
CONTRACT = [
    "Confidence",
    "token_logprobs",
    "TokenLogprobs",
    "confidence_score",
    "answer_confidence",
    "StreamingConfidence",
    "Scorer",
    "ece",
    "mce",
    "rms_ce",
    "equal_mass_ece",
    "brier",
    "nll",
    "accuracy",
    "mean_confidence",
    "reliability_diagram",
    "bin_index",
    "CalibrationAccumulator",
    "distinct_n",
    "pairwise_jaccard",
    "TemperatureScaling",
    "PlattScaling",
    "IsotonicCalibrator",
    "HistogramBinning",
    "IdentityCalibrator",
    "calibrator_from_dict",
    "pareto_frontier",
    "select_point",
    "risk_coverage",
    "aurc",
    "threshold_for_accuracy",
    "threshold_for_rate",
    "DEFAULT_TARGET_ACCURACIES",
    "certify_threshold",
    "certify_cascade",
    "clopper_pearson_upper",
    "Certificate",
    "Guarantee",
]


def test_contract_names_are_exported() -> None:
    missing = [name for name in CONTRACT if name not in calibration.__all__]
    assert missing == []
    for name in calibration.__all__:
        assert hasattr(calibration, name), name


def test_runtime_imports_numpy_only() -> None:
    code = (
        "import sys, calibration\n"
        "bad = [m for m in ('scipy', 'sklearn', 'torch', 'torchmetrics', 'pandas')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def test_error_hierarchy() -> None:
    assert issubclass(CalibrationError, ValueError)
    assert issubclass(DegenerateDataError, CalibrationError)
    assert issubclass(NoOptionTokensError, CalibrationError)
