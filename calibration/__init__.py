"""calibserve's calibration core: pure numpy math shared by `merge` (offline) and `server`.

Confidence from token logprobs, binned calibration metrics with a mergeable accumulator,
monotone calibrators with JSON round-trip, Pareto frontier selection and risk-coverage
thresholds, and the typed calibration document (`calibration.json`, the one place with
I/O). Errors: `CalibrationError(ValueError)` and its subclasses (`errors`).
"""

from calibserve.calibration.accumulator import CalibrationAccumulator
from calibserve.calibration.calibrators import (
    Calibrator,
    HistogramBinning,
    IdentityCalibrator,
    IsotonicCalibrator,
    OptionTemperature,
    PlattScaling,
    TemperatureScaling,
    calibrator_from_dict,
)
from calibserve.calibration.confidence import (
    METHODS,
    Confidence,
    StreamingConfidence,
    answer_confidence,
    confidence_score,
    normalize_token,
)
from calibserve.calibration.consistency import consistency_confidence
from calibserve.calibration.diversity import distinct_n, pairwise_jaccard
from calibserve.calibration.document import (
    CURRENT_VERSION,
    SUPPORTED_VERSIONS,
    CalibrationDocument,
    FitMetrics,
    Guarantee,
    MergeInfo,
    MethodCalibration,
    MethodParams,
    Threshold,
)
from calibserve.calibration.errors import CalibrationError, DegenerateDataError, NoOptionTokensError
from calibserve.calibration.family import (
    FAMILIES,
    SCALAR_FAMILIES,
    FamilyChoice,
    OptionLogits,
    choose_calibrator,
    fit_family,
)
from calibserve.calibration.frontier import RULES, pareto_frontier, select_point
from calibserve.calibration.guarantee import (
    Certificate,
    batch_error_target,
    certify_cascade,
    certify_threshold,
    clopper_pearson_upper,
)
from calibserve.calibration.logprobs import TokenLogprobs, parse_logprobs, token_logprobs
from calibserve.calibration.methods import (
    CONFIDENCE_METHODS,
    REGISTRY,
    ConfidenceMethod,
    confidence_method,
)
from calibserve.calibration.metrics import (
    N_BINS,
    accuracy,
    bin_index,
    brier,
    ece,
    equal_mass_ece,
    mce,
    mean_confidence,
    nll,
    reliability_diagram,
    rms_ce,
)
from calibserve.calibration.risk import (
    DEFAULT_TARGET_ACCURACIES,
    RiskCoverage,
    aurc,
    auroc,
    risk_coverage,
    threshold_for_accuracy,
    threshold_for_rate,
)
from calibserve.calibration.scorer import ScoredStream, Scorer, ServedMethod
from calibserve.calibration.verify import (
    VERIFY_QUESTION,
    VERIFY_SUFFIX,
    NoVerdictError,
    NoVerdictTokensError,
    VerdictTokens,
    require_verdict_tokens,
    verdict_tokens,
    verify_confidence,
    verify_messages,
    verify_prompt,
)

__all__ = [
    # confidence
    "Confidence",
    "TokenLogprobs",
    "parse_logprobs",
    "token_logprobs",
    "normalize_token",
    "confidence_score",
    "answer_confidence",
    "StreamingConfidence",
    "Scorer",
    "ScoredStream",
    "ServedMethod",
    "METHODS",
    # the method registry and the methods that need extra upstream work
    "CONFIDENCE_METHODS",
    "REGISTRY",
    "ConfidenceMethod",
    "confidence_method",
    "VERIFY_QUESTION",
    "VERIFY_SUFFIX",
    "verify_messages",
    "verify_prompt",
    "verify_confidence",
    "verdict_tokens",
    "require_verdict_tokens",
    "VerdictTokens",
    "NoVerdictTokensError",
    "consistency_confidence",
    # the calibration document (calibration.json)
    "CalibrationDocument",
    "MethodCalibration",
    "MethodParams",
    "Threshold",
    "FitMetrics",
    "MergeInfo",
    "CURRENT_VERSION",
    "SUPPORTED_VERSIONS",
    # metrics
    "N_BINS",
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
    # calibrators
    "Calibrator",
    "TemperatureScaling",
    "PlattScaling",
    "IsotonicCalibrator",
    "HistogramBinning",
    "IdentityCalibrator",
    "calibrator_from_dict",
    "OptionTemperature",
    # choosing the calibrator family by held-out ECE
    "FAMILIES",
    "SCALAR_FAMILIES",
    "FamilyChoice",
    "OptionLogits",
    "choose_calibrator",
    "fit_family",
    # choosing
    "RULES",
    "pareto_frontier",
    "select_point",
    "DEFAULT_TARGET_ACCURACIES",
    "RiskCoverage",
    # certified thresholds
    "Certificate",
    "Guarantee",
    "batch_error_target",
    "certify_cascade",
    "certify_threshold",
    "clopper_pearson_upper",
    "risk_coverage",
    "aurc",
    "auroc",
    "threshold_for_accuracy",
    "threshold_for_rate",
    # errors
    "CalibrationError",
    "DegenerateDataError",
    "NoOptionTokensError",
    "NoVerdictError",
]
