"""`GET /v1/models`: the engine's own model cards, under the names calibserve serves.

Each model calibserve serves is listed with the card its primary tier's engine lists for the
model that tier serves (vLLM's card: `id`, `object`, `created`, `owned_by`, `root`, `parent`,
`max_model_len`, `permission`), `id` renamed to the client-visible name where the two differ.
Escalation tiers are not listed: a client cannot name them, and the model it names answers with
the primary's limits. Replicas serve the same model, so whichever replica answers gives the card.

An engine that cannot say (down or restarting, not listing the model, no `/v1/models` at all) must
not make the model undiscoverable: the model is then listed with calibserve's own minimal card
(`owned_by: "calibserve"`, `root` the model's name). vLLM has no `GET /v1/models/{id}`; calibserve
serves it (OpenAI's API has it) with the same card as the list.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from calibserve.routing import UpstreamError, model_card
from calibserve.server.runtime import ModelRuntime, ServerRuntime

log = logging.getLogger("calibserve.server")
# Listing models is discovery, not generation: a hanging engine must not hold it for the tier's
# generation timeout.
LIST_TIMEOUT_S = 5.0


def own_card(model: ModelRuntime) -> dict[str, Any]:
    """calibserve's card for a model whose engine cannot give its own."""
    return {"id": model.name, "object": "model", "created": model.created,
            "owned_by": "calibserve", "root": model.name, "parent": None}


async def engine_card(model: ModelRuntime) -> dict[str, Any]:
    """The primary engine's card for `model` (renamed), else calibserve's own."""
    tier = model.primary
    if model.fast_fail:
        return own_card(model)
    try:
        async with asyncio.timeout(min(LIST_TIMEOUT_S, tier.settings.timeout_s)):
            listing = await tier.upstream.request_json("models")
    except (UpstreamError, TimeoutError) as exc:
        log.warning("model %s: the engine does not list its models (%s); serving "
                    "calibserve's own card", model.name, exc)
        return own_card(model)
    card = model_card(listing, tier.upstream_model)
    if card is None:
        log.warning("model %s: the engine does not list %r; serving calibserve's own card",
                    model.name, tier.upstream_model)
        return own_card(model)
    return {**card, "id": model.name}


async def model_list(runtime: ServerRuntime) -> dict[str, Any]:
    """The `/v1/models` answer: every served model's card, in configuration order."""
    cards = await asyncio.gather(*(engine_card(m) for m in runtime.models.values()))
    return {"object": "list", "data": list(cards)}
