"""Shared pytest fixtures."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

from testkit.servers import Endpoint, TokenServer

if TYPE_CHECKING:
    from testkit.postgres import PostgresServer

PG_TEMPLATE = "relay_template"
_PG_DATABASES = itertools.count(1)


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
# about 1 s each), started on first use. Its ``relay_template`` database holds the migrated
# schema; each test gets a fresh copy (CREATE DATABASE ... TEMPLATE). A server that cannot
# start fails the PostgreSQL tests with the reason: they are never skipped.


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    from testkit.postgres import PostgresServer

    server = PostgresServer()
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    try:
        from state.postgres_store import PostgresStore

        server.create_database(PG_TEMPLATE)
        PostgresStore(server.url(PG_TEMPLATE), pool_max=1).close()  # migrate once
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a fresh, migrated database of its own for this test."""
    name = f"t{next(_PG_DATABASES)}"
    url = pg_server.create_database(name, template=PG_TEMPLATE)
    yield url
    request.addfinalizer(lambda: pg_server.drop_database(name))
