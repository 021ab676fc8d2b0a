"""A check on a real engine: the verify prompt built on token ids is the text prompt's tokens.

Shared by the vLLM integration tests and the real-model tests (SmolLM2).
"""

from __future__ import annotations

from typing import Any

import httpx

import calibserve.calibration as calibration


async def check_verify_ids(url: str, model: str, question: str, prompt: str) -> None:
    """`test_verify_prompt_on_ids_is_the_text_prompts_tokens` on the engine at `url` (or a
    calibserve in front of it: it passes `return_token_ids` and /tokenize through)."""
    from calibserve.routing import Upstream
    from calibserve.routing.verify_tokens import VerifyTails, reply_ids

    tails = VerifyTails()
    upstream = Upstream("engine", url)
    user = [{"role": "user", "content": question}]
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("chat", {"messages": user}, calibration.VERIFY_QUESTION),
        ("completions", {"prompt": prompt}, calibration.VERIFY_SUFFIX),
    ]
    try:
        for endpoint, ask, suffix in cases:
            path = "chat/completions" if endpoint == "chat" else "completions"
            for max_tokens in (2, 12):  # cut by length, and (usually) ended by the model
                answer = await upstream.request_json(path, {
                    "model": model, **ask, "max_tokens": max_tokens, "temperature": 0,
                    "return_token_ids": True})
                choice = answer["choices"][0]
                ids = reply_ids(endpoint, answer, choice)
                assert ids is not None, choice
                tail = await tails.tail(upstream, model, endpoint, suffix)
                assert tail, endpoint
                if endpoint == "chat":
                    text = choice["message"]["content"]
                    tokenize = {"messages": calibration.verify_messages(user, text),
                                "add_generation_prompt": True}
                else:
                    text = choice["text"]
                    tokenize = {"prompt": calibration.verify_prompt(prompt, text)}
                async with httpx.AsyncClient() as client:
                    r = await client.post(f"{url}/tokenize", timeout=60,
                                          json={"model": model, **tokenize})
                assert [*ids.prompt, *ids.reply, *tail] == r.json()["tokens"], (endpoint, text)
    finally:
        await upstream.aclose()
