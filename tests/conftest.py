"""Shared fixtures: every test runs on asyncio, in an environment free of the user's own settings."""

from __future__ import annotations

import os

import pytest

_OWN_VARIABLES = ("GPUMANAGER_", "CLOUD_API_", "CLOUD_CSRF_", "AWS_", "RUNPOD_")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own keys, config or cloud credentials must never reach a test."""
    for name in list(os.environ):
        if name.startswith(_OWN_VARIABLES):
            monkeypatch.delenv(name)
