"""Free TCP ports that the operating system will not hand to anyone else.

`bind(0)` returns a port from the kernel's ephemeral range, and the kernel hands the same range
out to every `connect` and every other `bind(0)`. A port picked that way and bound only later
(calibserve binds its own port after a vLLM start of a minute or so) can be taken in between:
vLLM's own ZMQ sockets, an HTTP client, a test beside us. So we pick below the ephemeral range,
where the kernel never allocates, starting at a random offset so concurrent pickers rarely meet,
and check each candidate with a trial bind.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL_LOW = 32768  # Linux's default when /proc cannot be read


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range."""
    try:
        return int(_EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_LOW


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now and the kernel will not give out (see the module doc)."""
    high = ephemeral_low()
    if high - LOWEST < 100:  # an unusual range reaching down here: fall back to the kernel
        return _kernel_port(host)
    candidates = range(LOWEST, high)
    start = random.randrange(len(candidates))
    for i in range(len(candidates)):
        port = candidates[(start + i) % len(candidates)]
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    return _kernel_port(host)


def _kernel_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
