"""Network probes: whether anything answers at an address, in seconds, before a library retries it for minutes."""

from __future__ import annotations

import socket


def probe(host: str, port: int, timeout: float = 5.0) -> None:
    """Open and close one TCP connection to ``host:port``; raises ``OSError`` when nothing answers.

    Used before handing an address to a library that would retry it for minutes (MLflow, Ray).
    """
    socket.create_connection((host.strip("[]"), port), timeout=timeout).close()
