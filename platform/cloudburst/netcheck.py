"""Is a server there? A TCP connect within a timeout, before a client library retries for
minutes (object stores, the MLflow tracking server, test servers)."""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def endpoint_address(url: str) -> tuple[str, int]:
    """(host, port) of an endpoint URL, or of ``host[:port]`` (taken as http).

    Without a port: 443 for https, else 80. Without a host: ``localhost``.
    """
    parsed = urlparse(url if "://" in url else f"http://{url}")
    host = parsed.hostname or "localhost"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return host, port


def tcp_probe(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to ``host:port`` opens within ``timeout`` seconds, else why
    not, in words (e.g. ``"Connection refused"``, ``"timed out"``). The connection is closed
    at once; nothing is sent."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)
