"""The least-privilege role of docs/security.md: enough for every command, and no more.

(.ci/run also runs the end-to-end tests connected as this role, with
AGENT_IDENTITY_TEST_AS=least-privilege.)
"""

import psycopg
import pytest
from psycopg import errors

from tests import support


@pytest.fixture(scope="module")
def role_dsn(database):
    with support.least_privilege_role(database) as dsn:
        yield dsn


def test_it_reads_kan_rows_through_row_level_security(role_dsn, kan):
    kan.managed_workspace()
    with psycopg.connect(role_dsn) as conn:
        for table in ("user", "workspace", "workspace_members"):
            assert conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] > 0, table


@pytest.mark.parametrize("statement, error", [
    ("DELETE FROM agent_audit_event", errors.InsufficientPrivilege),
    ("DELETE FROM agent_token", errors.InsufficientPrivilege),
    ("DELETE FROM agent_identity", errors.InsufficientPrivilege),
    ("""UPDATE workspace SET name = 'mine'""", errors.InsufficientPrivilege),
    ("""INSERT INTO "user" (email, "emailVerified") VALUES ('x@example.com', true)""", errors.InsufficientPrivilege),
    ("DELETE FROM workspace_members", errors.InsufficientPrivilege),
    ("CREATE TABLE sneaky (id int)", errors.InsufficientPrivilege),
    ("DROP TABLE agent_audit_event", errors.InsufficientPrivilege),
    ("ALTER TABLE agent_identity DISABLE ROW LEVEL SECURITY", errors.InsufficientPrivilege),
])
def test_it_cannot_delete_write_kan_or_change_the_schema(role_dsn, statement, error):
    with psycopg.connect(role_dsn) as conn:
        with pytest.raises(error):
            conn.execute(statement)


def test_the_cli_works_as_it(role_dsn, kan, cli):
    workspace, admin = kan.managed_workspace()
    run = lambda *args: cli(*args, "--workspace-public-id", workspace["publicId"], "--json",  # noqa: E731
                            env={"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}, dsn=role_dsn)
    created = run("create", "--slug", "least", "--display-name", "L", "--token-name", "t",
                  "--scopes", "boards:read", "--confirm")
    assert created.code == 0, created.stderr
    for command in ("rotate", "pause", "revoke"):
        assert run(command, "--slug", "least", "--confirm").code == 0
    assert run("inspect", "--slug", "least").json["identity"]["status"] == "revoked"
    verified = cli("verify", "--json", env={"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}, dsn=role_dsn,
                   input=created.json["token"]["secret"])
    assert verified.json["reason"] == "token_revoked"
