"""Memory of the feedback replay guard per remembered id: full ids vs 16-byte digests.

The guard (server/ids.py ReplayGuard) remembers every accepted (id, choice) until its TTL, up to
`feedback_memory` entries (200,000 by default). This fills one with N entries keyed the old way
(the full signed id string) and the current way (server.feedback.replay_key) and reports the
traced Python memory per entry and for a full default guard.

    .venv/bin/python -m benchmarks.replay_memory [--n 20000]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable

from calibserve.server.config import ServerSettings
from calibserve.server.feedback import replay_key
from calibserve.server.ids import ReplayGuard, ResponseIdSigner


def traced_bytes(n: int, key: Callable[[str], str | bytes], ids: list[str]) -> int:
    guard = ReplayGuard(capacity=n, ttl_s=3600)
    now = time.time()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for rid in ids[:n]:
        guard.add(key(rid), issued_at=now, now=now)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    signer = ResponseIdSigner("bench-key")
    # A served answer's id: one choice, scores at full precision, as server/proxy.py issues it.
    ids = [signer.issue("chatcmpl-", "calibserve-demo", [0.8312345678901234],
                        [0.9712345678901234]) for _ in range(args.n)]
    capacity = ServerSettings.model_fields["feedback_memory"].default
    print(f"{args.n} ids, {sum(map(len, ids)) / len(ids):.0f} characters each on average")
    rows = {"full id (before)": lambda rid: f"{rid}#0", "16-byte digest (now)":
            lambda rid: replay_key(rid, 0)}
    per = {}
    for name, key in rows.items():
        per[name] = traced_bytes(args.n, key, ids) / args.n
        print(f"{name:22s} {per[name]:6.0f} B/entry, full guard ({capacity:,} entries) "
              f"{per[name] * capacity / 2**20:5.1f} MiB")
    a, b = per.values()
    print(f"ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
