"""Chat templates: the one a run trains with, and the built-in ones for base models that have none.

A base checkpoint usually has no chat template; `--chat-template` names a Jinja file or a
built-in (`gemma`: Gemma's turn format). The template a run trains with is written into the
output checkpoint (`chat_template.jinja`), so serving renders prompts exactly as training did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calibserve.tune.errors import InvalidConfig

__all__ = ["GEMMA_CHAT_TEMPLATE", "BUILTIN_TEMPLATES", "resolve_template"]

# Gemma's turn format: `<start_of_turn>user`, newline, the message, `<end_of_turn>`, newline; the
# reply turn is `model`; a system message becomes a user turn (Gemma has no system role); BOS
# first. All of these tokens are already in the Gemma 3 base vocabulary.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if role == 'system' %}{% set role = 'user' %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"gemma": GEMMA_CHAT_TEMPLATE}


def resolve_template(spec: str | None, tokenizer: Any) -> tuple[str, str]:
    """(template text, where it came from): `spec` (a built-in name or a file), else the
    tokenizer's own template; a tokenizer without one needs `--chat-template`."""
    if spec is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own.strip():
            return own, "checkpoint"
        raise InvalidConfig(
            "the checkpoint's tokenizer has no chat template; pass a Jinja file or one of: "
            + ", ".join(BUILTIN_TEMPLATES), "--chat-template")
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec], f"builtin:{spec}"
    path = Path(spec)
    if not path.is_file():
        raise InvalidConfig(
            f"{spec!r} is neither a file nor a built-in template ({', '.join(BUILTIN_TEMPLATES)})",
            "--chat-template")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InvalidConfig(f"{spec} is empty", "--chat-template")
    return text, f"file:{path.name}"
