"""`verify`'s yes and no tokens in a checkpoint's tokenizer (`calibration.verify`'s words).

`verify` needs a tokenizer with a yes and a no token (`calibration.require_verdict_tokens`);
`check_verify` refuses one without them (`ServeFitError` naming `--verify`) before anything is
written, and `checkpoint_verdict_ids` gives the ids the verdict request asks the engine for.
"""

from __future__ import annotations

from pathlib import Path

from calibserve.calibration import (
    NoVerdictTokensError,
    VerdictTokens,
    require_verdict_tokens,
    verdict_tokens,
)
from calibserve.calibration.verify import verdict_word
from calibserve.fit.errors import ServeFitError

__all__ = [
    "check_verify",
    "checkpoint_verdict_ids",
    "checkpoint_verdict_tokens",
]


def checkpoint_verdict_ids(model_dir: Path) -> dict[str, list[int]]:
    """The checkpoint tokenizer's yes and no token ids (`{"yes": [...], "no": [...]}`, either
    list may be empty): what verify's request asks the engine for (`verdict_token_ids`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = tokenizer.get_vocab()
    # Vocabulary entries are in the tokenizer's own spelling ("Ġyes", "▁no"); a candidate counts
    # only if its decoded text, which the engine returns in the logprobs, reads the same way.
    candidates = verdict_tokens(vocab)
    out: dict[str, list[int]] = {"yes": [], "no": []}
    for token in (*candidates.yes, *candidates.no):
        word = verdict_word(str(tokenizer.decode([vocab[token]])))
        if word is not None:
            out[word].append(vocab[token])
    return {side: sorted(ids) for side, ids in out.items()}


def checkpoint_verdict_tokens(model_dir: Path) -> VerdictTokens:
    """The yes and no tokens of the checkpoint's tokenizer, each as the engine prints it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = checkpoint_verdict_ids(model_dir)
    return verdict_tokens(str(tokenizer.decode([i])) for i in (*ids["yes"], *ids["no"]))


def check_verify(model_dir: Path) -> VerdictTokens:
    """`verify`'s yes/no tokens in the checkpoint's tokenizer; `ServeFitError` (`--verify`)
    when it lacks them."""
    found = checkpoint_verdict_tokens(model_dir)
    try:
        return require_verdict_tokens([*found.yes, *found.no])
    except NoVerdictTokensError as exc:
        raise ServeFitError(f"{model_dir}: {exc}; fit without it (--no-verify)",
                            "--verify") from None
