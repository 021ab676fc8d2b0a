"""Which free-form methods a fit fits: the token statistics, `verify`, `consistency`.

By default (`verify=None`) `verify` is fitted when the checkpoint's tokenizer has a yes and a no
token and left out with a note otherwise; `verify=True` refuses such a tokenizer. `consistency`
costs k more generations per question, so it is opt-in.
"""

from __future__ import annotations

from pathlib import Path

from calibserve.calibration import NoVerdictTokensError, require_verdict_tokens
from calibserve.fit.verdict import check_verify, checkpoint_verdict_tokens

__all__ = [
    "DEFAULT_FIT_METHODS",
    "FREE_FORM_FIT_METHODS",
    "TOKEN_FIT_METHODS",
    "fit_methods",
]

# The token statistics: recomputed from any reply's logprobs.
TOKEN_FIT_METHODS: tuple[str, ...] = ("mean", "min", "first", "quantile")
# Every free-form method the fit can fit; `verify` and `consistency` are read from the serving
# pass that served them (their extra requests are the server's own).
FREE_FORM_FIT_METHODS: tuple[str, ...] = (*TOKEN_FIT_METHODS, "verify", "consistency")
# What `calibserve calibrate` fits unless told otherwise: consistency costs k generations per
# reply, so it is opt-in; verify is fitted when the tokenizer has yes/no tokens.
DEFAULT_FIT_METHODS: tuple[str, ...] = (*TOKEN_FIT_METHODS, "verify")


def fit_methods(model_dir: Path, verify: bool | None, consistency: bool) -> tuple[
        tuple[str, ...], list[str]]:
    """The methods `calibserve calibrate` fits, and notes on what was left out and why:
    `verify` None fits verify when the tokenizer has yes/no tokens, True requires them."""
    methods = list(TOKEN_FIT_METHODS)
    notes: list[str] = []
    if verify is None:
        found = checkpoint_verdict_tokens(model_dir)
        if found.usable:
            methods.append("verify")
        else:
            try:
                require_verdict_tokens([*found.yes, *found.no])
            except NoVerdictTokensError as exc:
                notes.append(f"verify not fitted: {exc}")
    elif verify:
        check_verify(model_dir)
        methods.append("verify")
    if consistency:
        methods.append("consistency")
    return tuple(methods), notes
