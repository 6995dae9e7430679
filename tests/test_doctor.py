"""doctor: one line per check, a fix for each failure, exit 0 only when all pass."""

import io
import secrets

import psycopg
import pytest

import agent_identity_admin as tool
from tests import support


def checks(result: support.Run) -> dict[str, bool]:
    return {check["name"]: check["ok"] for check in result.json["checks"]}


def test_a_healthy_database(cli, operator):
    result = cli("doctor", "--json", "--workspace-public-id", operator.workspace["publicId"],
                 env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert result.code == 0, result.stdout
    assert checks(result) == {"connection": True, "session limits": True, "Kan tables": True, "names": True,
                              "agent tables": True, "token hashes": True, "safeguards": True, "times": True,
                              "audit chains": True, "row level security": True, "privileges": True, "actor": True,
                              "login": True}
    assert result.json["actorProven"] is support.PROVEN  # (tests/test_proven_actor.py)
    human = cli("doctor", env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    lines = human.stdout.splitlines()
    assert "✓ agent tables: 6 present, in schema public, every column as expected" in lines
    assert "✓ Kan tables: 6 present, in schema public" in lines
    assert "\033[" not in human.stdout, "no colour when stdout is not a terminal"


def test_an_actor_who_may_not_manage(cli, db, kan, operator):
    outsider = kan.user()
    before = support.snapshot(db)
    result = cli("doctor", "--workspace-public-id", operator.workspace["publicId"],
                 env={"AGENT_IDENTITY_ADMIN_EMAIL": outsider["email"]})
    assert result.code == 6
    assert f"✗ actor: \"{outsider['email']}\" is not an active member of workspace" in result.stdout
    assert "  fix: an admin of the workspace can grant workspace:manage in Kan" in result.stdout
    assert support.snapshot(db) == before, "doctor records no access.denied event"


GIVE_ACTOR = "give --admin-user-email or AGENT_IDENTITY_ADMIN_EMAIL"
GRANT = "an admin of the workspace can grant workspace:manage in Kan"


@pytest.mark.parametrize("email, detail, fix", [
    ("", "say who you are: --admin-user-email or AGENT_IDENTITY_ADMIN_EMAIL", GIVE_ACTOR),
    ("\x1b[2Jops@example.com", "admin user email contains a control character (U+001B)", GIVE_ACTOR),
    ("kan_agent_Ab12Cd34Ef56_Zz9@example.com", "admin user email contains a token with its secret", GIVE_ACTOR),
    ("kan_agent_Ab12Cd34Ef56@example.com", 'no Kan user has the email "kan_agent_Ab12Cd34Ef56@example.com"', GRANT),
])
def test_the_actor_is_checked_as_every_command_checks_it(cli, operator, email, detail, fix):
    """doctor validates the actor's email like the other commands, and blanks token-shaped text."""
    result = cli("doctor", "--json", "--workspace-public-id", operator.workspace["publicId"],
                 env={"AGENT_IDENTITY_ADMIN_EMAIL": email})
    assert result.code == 6
    [actor] = [c for c in result.json["checks"] if c["name"] == "actor"]
    assert actor["ok"] is False and actor["detail"].startswith(detail), actor["detail"]
    assert actor["fix"] == fix
    assert "\x1b" not in result.stdout and "Zz9" not in result.stdout


def test_column_drift_is_reported_column_by_column(server_dsn):
    dsn = support.create_database(server_dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute('ALTER TABLE agent_token ALTER COLUMN "lastUsedAt" TYPE timestamptz')
            conn.execute('ALTER TABLE agent_audit_event DROP COLUMN reason')
        result = support.run_cli(["doctor", "--json"], dsn)
        assert result.code == 6
        [agent] = [c for c in result.json["checks"] if c["name"] == "agent tables"]
        assert agent["detail"] == ('agent_token."lastUsedAt" is timestamp with time zone, expected timestamp without '
                                   'time zone; agent_audit_event."reason" is missing, expected text')
        assert agent["fix"].startswith("apply `agent-identity schema --db-schema public` as the owner")
    finally:
        support.drop_database(server_dsn, dsn)


def test_a_role_that_row_level_security_blinds(database):
    blind = f"agent_identity_blind_{secrets.token_hex(4)}"  # roles are server-wide; runs may share a server
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{blind}" LOGIN')
        conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{blind}"')
    try:
        result = support.run_cli(["doctor", "--json"], psycopg.conninfo.make_conninfo(database, user=blind))
        assert result.code == 6
        [rls] = [c for c in result.json["checks"] if c["name"] == "row level security"]
        assert rls["ok"] is False and "workspace_members" in rls["detail"]
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{blind}"')
            conn.execute(f'DROP ROLE "{blind}"')


def test_the_documented_least_privilege_role_passes(database):
    with support.least_privilege_role(database) as dsn:
        assert support.run_cli(["doctor"], dsn).code == 0


def test_an_unreachable_database_is_a_failed_check_not_an_error():
    result = support.run_cli(["doctor", "--json"], "postgresql://u:Hidden-99@127.0.0.1:9/x")
    assert result.code == 6
    assert checks(result) == {"connection": False}
    assert "Hidden-99" not in result.stdout + result.stderr


@pytest.mark.parametrize("no_color, coloured", [("", True), ("1", False)])
def test_colour_only_on_a_terminal_without_no_color(cli_dsn, monkeypatch, no_color, coloured):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("DATABASE_URL", cli_dsn)
    monkeypatch.setenv("NO_COLOR", no_color)
    out = Terminal()
    tool.main(["doctor"], out, io.StringIO())
    assert ("\033[32m✓\033[0m" in out.getvalue()) == coloured
