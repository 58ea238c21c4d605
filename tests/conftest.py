"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.servers import Endpoint, TokenServer


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    """A recording webhook endpoint on loopback that can be told to fail."""
    async with Endpoint() as server:
        yield server


@pytest.fixture
async def token_server() -> AsyncIterator[TokenServer]:
    """An OAuth 2 token endpoint on loopback (``token_server.token_url``)."""
    async with TokenServer() as server:
        yield server
