"""Shared fixtures: every test runs on asyncio, with an environment free of the user's settings."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
