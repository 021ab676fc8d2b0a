"""Find, open and validate the two parent checkpoints, and plan the merged tensors.

A parent is a local directory or a Hugging Face Hub id (fetched with `snapshot_download`; only
safetensors weights are supported, since they can be read a slice at a time without unpickling).

Compatibility rules (anything else is refused with the tensors named, before anything is written):
- same `model_type` and `architectures`, same tensor names, same shapes;
- vocabulary growth: an aligned model may add tokens. A tensor whose first dimension equals each
  model's vocabulary size (embeddings, LM head) may be longer in the aligned model; the rows only
  the aligned model has are taken from it unchanged at every lambda (there is nothing to
  interpolate them with). The base tokenizer must be a prefix of the aligned one (same id for
  every base token). A base vocabulary larger than the aligned one is refused;
- tied embeddings: a tied model stores no LM head; when only one parent is tied, its LM head is
  its input embedding, and the merged model is written untied.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibserve.merge.errors import IncompatibleCheckpoints, InputNotFound
from calibserve.merge.tensorfile import TensorInfo, read_header

__all__ = [
    "Checkpoint",
    "TensorPlan",
    "PairPlan",
    "resolve_checkpoint",
    "open_checkpoint",
    "plan_pair",
    "TOKENIZER_FILES",
]

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]
OUTPUT_EMBEDDING = "lm_head.weight"
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
MAX_NAMED = 8  # how many offending tensors an error message lists


@dataclass
class Checkpoint:
    """An opened parent: its directory, config and where each stored tensor lives."""

    ref: str  # what the user passed
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @property
    def tied(self) -> bool:
        text_cfg = self.config.get("text_config") or {}
        value = self.config.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings"))
        # transformers' PretrainedConfig default is True; most Llama configs spell it out.
        return bool(True if value is None else value)

    @property
    def vocab_size(self) -> int | None:
        v = self.config.get("vocab_size") or (self.config.get("text_config") or {}).get(
            "vocab_size"
        )
        return int(v) if v is not None else None

    def input_embedding(self) -> str | None:
        for name in self.tensors:
            if name.endswith(INPUT_EMBEDDING_SUFFIXES):
                return name
        return None

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _is_local_like(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or "\\" in ref or ref.count("/") != 1


def resolve_checkpoint(ref: str, param: str) -> Path:
    """A local directory for `ref`, downloading Hub ids (weights as safetensors only)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputNotFound(f"{ref} is a file; pass the checkpoint directory", param)
        return path.resolve()
    if _is_local_like(ref) or not HUB_ID.match(ref):
        raise InputNotFound(f"{ref} does not exist (and is not a Hugging Face Hub id)", param)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise InputNotFound(f"{ref}: huggingface_hub is not installed", param) from exc
    try:
        return Path(snapshot_download(ref, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise InputNotFound(f"cannot fetch {ref} from the Hugging Face Hub: {exc}", param) from exc


def open_checkpoint(ref: str, param: str) -> Checkpoint:
    """Resolve `ref` and read its config and safetensors headers (no weights are read)."""
    path = resolve_checkpoint(ref, param)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InputNotFound(f"{path} has no config.json: not a Hugging Face checkpoint", param)
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IncompatibleCheckpoints(f"cannot read {cfg_path}: {exc}", param) from exc
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise IncompatibleCheckpoints(f"cannot read {index}: {exc}", param) from exc
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.pt")
        )
        hint = (
            f" (found {', '.join(pickles[:3])}: convert them to safetensors first)"
            if pickles
            else ""
        )
        raise InputNotFound(f"{path} has no .safetensors weights{hint}", param)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        if not f.is_file():
            raise InputNotFound(f"{f} is listed in the index but missing", param)
        try:
            found, _ = read_header(f)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise IncompatibleCheckpoints(f"cannot read {f}: {exc}", param) from exc
        tensors.update(found)
    return Checkpoint(ref=ref, path=path, config=config, tensors=tensors)


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """One output tensor: where to read each parent, and the output dtype and shape.

    `base_rows < shape[0]` marks vocabulary growth: rows from `base_rows` on come from the
    aligned model only.
    """

    name: str
    base: TensorInfo
    aligned: TensorInfo
    shape: tuple[int, ...]
    dtype: str
    base_rows: int

    @property
    def grown(self) -> bool:
        return bool(self.shape) and self.base_rows < self.shape[0]

    @property
    def interpolated(self) -> bool:
        # Integer buffers (rare in checkpoints) cannot be averaged: they are taken from aligned.
        return self.base.is_float and self.aligned.is_float


@dataclass
class PairPlan:
    """Everything the sweep and the writer need to know about the merged model."""

    base: Checkpoint
    aligned: Checkpoint
    tensors: list[TensorPlan]
    tied: bool  # whether the merged model ties its input and output embeddings
    notes: list[str] = field(default_factory=list)

    def out_config(self) -> dict[str, Any]:
        cfg = dict(self.aligned.config)
        cfg["tie_word_embeddings"] = self.tied
        return cfg

    def total_bytes(self) -> int:
        return sum(_nbytes(t) for t in self.tensors)


def _nbytes(t: TensorPlan) -> int:
    n = t.aligned.itemsize
    for d in t.shape:
        n *= d
    return n


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_NAMED])
    return shown + (f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


def _effective_tensors(ck: Checkpoint, other: Checkpoint) -> dict[str, TensorInfo]:
    """Stored tensors plus the LM head a tied model implies when the other parent stores one."""
    tensors = dict(ck.tensors)
    if OUTPUT_EMBEDDING not in tensors and OUTPUT_EMBEDDING in other.tensors and ck.tied:
        embed = ck.input_embedding()
        if embed is not None:
            tensors[OUTPUT_EMBEDDING] = tensors[embed]
    return tensors


def plan_pair(base: Checkpoint, aligned: Checkpoint) -> PairPlan:
    """Check the parents are compatible and plan every output tensor (see module docstring)."""
    notes: list[str] = []
    for key in ("model_type", "architectures"):
        b, a = base.config.get(key), aligned.config.get(key)
        if b != a:
            raise IncompatibleCheckpoints(
                f"different {key}: base has {b!r}, aligned has {a!r}", "--aligned"
            )
    b_tensors = _effective_tensors(base, aligned)
    a_tensors = _effective_tensors(aligned, base)
    only_base = sorted(set(b_tensors) - set(a_tensors))
    only_aligned = sorted(set(a_tensors) - set(b_tensors))
    if only_base or only_aligned:
        parts = []
        if only_base:
            parts.append(f"only in base: {_names(only_base)}")
        if only_aligned:
            parts.append(f"only in aligned: {_names(only_aligned)}")
        raise IncompatibleCheckpoints("parameter names differ; " + "; ".join(parts), "--aligned")

    vb, va = base.vocab_size, aligned.vocab_size
    plans: list[TensorPlan] = []
    bad: list[str] = []
    # Keep the aligned checkpoint's own order: it is the layout its authors chose.
    for name in sorted(a_tensors, key=lambda n: (str(a_tensors[n].file), a_tensors[n].offset)):
        b, a = b_tensors[name], a_tensors[name]
        base_rows = a.shape[0] if a.shape else 0
        if b.shape != a.shape:
            grown = (
                len(a.shape) >= 1
                and len(b.shape) == len(a.shape)
                and b.shape[1:] == a.shape[1:]
                and vb is not None
                and va is not None
                and vb < va
                and b.shape[0] == vb
                and a.shape[0] == va
            )
            if not grown:
                bad.append(f"{name} (base {list(b.shape)}, aligned {list(a.shape)})")
                continue
            base_rows = b.shape[0]
        if b.is_float != a.is_float:
            bad.append(f"{name} (base {b.dtype}, aligned {a.dtype})")
            continue
        plans.append(TensorPlan(name, b, a, a.shape, a.dtype, base_rows))
    if bad:
        hint = ""
        if vb is not None and va is not None and vb > va:
            hint = (
                f" The base vocabulary ({vb}) is larger than the aligned one ({va}); only growth "
                "in the aligned model is supported."
            )
        raise IncompatibleCheckpoints(f"tensor shapes differ: {_names(bad)}.{hint}", "--aligned")
    if vb is not None and va is not None and vb < va:
        notes.append(
            f"vocabulary grew from {vb} to {va}: rows {vb}..{va - 1} of the embeddings are taken "
            "from the aligned model at every lambda"
        )
    tied = base.tied and aligned.tied and OUTPUT_EMBEDDING not in plans_names(plans)
    if base.tied != aligned.tied:
        notes.append(
            "only one parent ties its embeddings: its LM head is its input embedding, and the "
            "merged model is written untied"
        )
    return PairPlan(base=base, aligned=aligned, tensors=plans, tied=tied, notes=notes)


def plans_names(plans: list[TensorPlan]) -> set[str]:
    return {p.name for p in plans}


def has_tokenizer(path: Path) -> bool:
    return any(
        (path / f).is_file()
        for f in (
            "tokenizer.json",
            "tokenizer.model",
            "vocab.json",
            "vocab.txt",
            "tokenizer_config.json",
        )
    )


def check_tokenizers(plan: PairPlan) -> None:
    """The aligned tokenizer (which is served) must exist and extend the base one, id for id."""
    from transformers import AutoTokenizer

    if not has_tokenizer(plan.aligned.path):
        raise IncompatibleCheckpoints(
            f"{plan.aligned.path} has no tokenizer; the merged model is served with the aligned "
            "model's tokenizer and chat template",
            "--aligned",
        )
    if not has_tokenizer(plan.base.path):
        plan.notes.append("the base checkpoint has no tokenizer: tokenizer compatibility unchecked")
        return
    try:
        tb = AutoTokenizer.from_pretrained(plan.base.path)
        ta = AutoTokenizer.from_pretrained(plan.aligned.path)
    except (OSError, ValueError) as exc:
        raise IncompatibleCheckpoints(f"cannot load a tokenizer: {exc}", "--aligned") from exc
    vb, va = tb.get_vocab(), ta.get_vocab()
    moved = sorted(tok for tok, i in vb.items() if va.get(tok) != i)
    if moved:
        raise IncompatibleCheckpoints(
            f"tokenizers differ: {len(moved)} base tokens have another id (or none) in the aligned "
            f"tokenizer, e.g. {_names([repr(t) for t in moved])}",
            "--aligned",
        )
    if ta.chat_template is None:
        plan.notes.append("the aligned tokenizer has no chat template")
