"""systemd readiness: `sd_notify` over $NOTIFY_SOCKET, without a dependency.

With `Type=notify` systemd considers the agent started only once it sent READY=1 (stores open,
collectors and sync loop running), and shows STOPPING=1 during the orderly shutdown.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to systemd; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True
