"""SCRAM-SHA-256 verifiers: how a password is handed to PostgreSQL without its plain text.

`CREATE ROLE .. PASSWORD '<verifier>'` stores the verifier as it is; the password itself then
never appears in a statement, a server log or a process list.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets


def scram_verifier(password: str, *, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677)."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"
