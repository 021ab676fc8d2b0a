"""Who an upstream is: its API root, the model it serves, and whether it is up.

The one rule for a base URL's `/v1` root (`api_root`) and for the server root its `/health`
lives under (`server_root`); the one way to learn a model name from `/v1/models`
(`served_models` + `choose_model`, together `discover_model`) and its card there (`model_card`);
the one health probe.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from calibserve.routing.upstream_client import UpstreamClient


def _is_version(segment: str) -> bool:
    return len(segment) >= 2 and segment[0] == "v" and segment[1:].isdigit()


def api_root(base_url: str) -> str:
    """`http://h:p` -> `http://h:p/v1`; a URL whose path already ends in `/vN` is kept."""
    url = base_url.rstrip("/")
    if _is_version(urlsplit(url).path.rsplit("/", 1)[-1]):
        return url
    return url + "/v1"


def server_root(base_url: str) -> str:
    """The server a base URL belongs to: `api_root` without its `/vN` (where `/health` is)."""
    return api_root(base_url).rsplit("/", 1)[0]


def model_cards(listing: Any) -> list[dict[str, Any]]:
    """The model cards of a `/v1/models` answer (`{"data": [{"id": ...}, ...]}`), as listed."""
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return []
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def model_ids(listing: Any) -> list[str]:
    """The model ids of a `/v1/models` answer."""
    return [m["id"] for m in model_cards(listing)]


def model_card(listing: Any, model: str) -> dict[str, Any] | None:
    """The card a `/v1/models` answer lists for `model` (None: not listed)."""
    return next((m for m in model_cards(listing) if m["id"] == model), None)


def choose_model(ids: list[str], preferred: str | None = None) -> str | None:
    """`preferred` when the upstream serves it, else its only model, else None (ambiguous)."""
    if preferred is not None and preferred in ids:
        return preferred
    return ids[0] if len(ids) == 1 else None


async def served_models(upstream: UpstreamClient) -> list[str]:
    """The ids the upstream lists at `/v1/models`; raises UpstreamError when it cannot list."""
    return model_ids(await upstream.request_json("models"))


async def discover_model(upstream: UpstreamClient, preferred: str | None = None) -> str | None:
    """The model name to send to this upstream (see `choose_model`); raises UpstreamError."""
    return choose_model(await served_models(upstream), preferred)


async def probe_health(base_url: str, timeout: float = 1.0) -> bool:
    """Does the server answer `GET /health` with anything but a 5xx within `timeout`?"""
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(server_root(base_url) + "/health")
        return response.status_code < 500
    except httpx.HTTPError:
        return False
