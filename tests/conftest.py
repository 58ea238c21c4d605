"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from testkit.servers import Endpoint, TokenServer


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


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One real Prefect test harness (a temporary server and database) for the whole run:
    it takes several seconds to start, so every test module that runs flows shares it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
