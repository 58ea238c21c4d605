"""Shared pytest fixtures."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

from testkit.servers import Endpoint, TokenServer

if TYPE_CHECKING:
    from testkit.postgres import PostgresServer

PG_DATABASE = "relay_tests"
_PG_SCHEMAS = itertools.count(1)


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


# -- PostgreSQL ----------------------------------------------------------------------------------
# One real server per pytest process (each xdist worker is one: ``-n 2`` starts two servers,
# about 1 s each), started on first use, with one database for the tests. Each test gets a
# fresh schema of its own there (the URL's search_path), which the store migrates when it
# opens: about 40 ms, against 100 to 170 ms for a database copied from a template. A
# server that cannot start fails the PostgreSQL tests with the reason: they are never
# skipped.


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    from testkit.postgres import PostgresServer

    server = PostgresServer()
    try:
        server.start()
        server.create_database(PG_DATABASE)
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """The URL of a fresh, empty schema for this test (the store migrates it)."""
    return pg_server.create_schema(PG_DATABASE, f"t{next(_PG_SCHEMAS)}")
