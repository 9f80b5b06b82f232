"""Redaction: a registered database password never survives into text shown to anyone."""

from __future__ import annotations

from host_agent.logging import redact, register_url
from host_agent.urls import redact_url


def test_url_password_is_redacted_in_urls_and_on_its_own() -> None:
    register_url("postgresql://agent:Pa@ss-W0rd%2F9@db.example:5432/events")
    shown = redact(
        "cannot connect to postgresql://agent:Pa@ss-W0rd%2F9@db.example:5432/events; "
        "password was Pa@ss-W0rd/9 (quoted Pa%40ss-W0rd%2F9)"
    )
    assert "ss-W0rd" not in shown
    assert "postgresql://agent:***@db.example:5432/events" in shown  # the host stays useful


def test_unregistered_url_passwords_are_still_masked() -> None:
    assert redact("postgresql://u:other-secret@h/d") == "postgresql://u:***@h/d"


def test_query_parameter_passwords_are_secrets_too() -> None:
    url = "postgresql://agent@db.example/events?sslmode=require&password=Qp-9-query-secret"
    assert redact_url(url) == "postgresql://agent@db.example/events?sslmode=require&password=***"
    register_url(url)
    assert "Qp-9-query-secret" not in redact("the server said: bad password Qp-9-query-secret")
