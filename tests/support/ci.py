"""A real component a test needs is missing: skip on a developer's machine, fail on CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(message: str) -> NoReturn:
    """Under CI=true every real-component test must run, so a missing piece fails loudly."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run this test: {message}", pytrace=False)
    pytest.skip(message)
