"""The least-privilege role of docs/security.md: enough for every command, and no more.

(.ci/run also runs the end-to-end tests connected as this role, with
AGENT_IDENTITY_TEST_AS=least-privilege.)
"""

import secrets

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import make_conninfo

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


@pytest.fixture
def ended(operator, db):
    """An identity revoked with its token, and a live token with an expiry: (identity id, live token id)."""
    operator.create("ended")
    operator("revoke", "--slug", "ended", "--confirm")
    live = operator.create("living")
    identity = db.execute('SELECT id FROM agent_identity WHERE slug = %s AND "workspaceId" = %s',
                          ("ended", operator.workspace["id"])).fetchone()[0]
    token = db.execute('SELECT id FROM agent_token WHERE "publicId" = %s',
                       (live.json["token"]["publicId"],)).fetchone()[0]
    return identity, token


@pytest.mark.parametrize("statement, error", [
    # The audit log: no UPDATE at all.
    ("""UPDATE agent_audit_event SET "actorEmail" = 'someone-else@example.com'""", errors.InsufficientPrivilege),
    ("""UPDATE agent_audit_event SET reason = NULL""", errors.InsufficientPrivilege),
    # Columns the tool never writes.
    ("""UPDATE agent_token SET "tokenHash" = 'x'""", errors.InsufficientPrivilege),
    ("""UPDATE agent_token SET scopes = '{members:read}'""", errors.InsufficientPrivilege),
    ("""UPDATE agent_identity SET "workspaceId" = 1""", errors.InsufficientPrivilege),
    # Columns it writes, turned back: refused by the schema's triggers.
    ("""UPDATE agent_token SET "revokedAt" = NULL WHERE "agentIdentityId" = %(identity)s""", errors.CheckViolation),
    ("""UPDATE agent_identity SET status = 'active', "revokedAt" = NULL WHERE id = %(identity)s""",
     errors.CheckViolation),
    ("""UPDATE agent_token SET "expiresAt" = NULL WHERE id = %(token)s""", errors.CheckViolation),
    ("""UPDATE agent_token SET "expiresAt" = "expiresAt" + interval '1 year' WHERE id = %(token)s""",
     errors.CheckViolation),
    # Kan's users: id and email only.
    ('SELECT name FROM "user"', errors.InsufficientPrivilege),
    ('SELECT * FROM "user"', errors.InsufficientPrivilege),
])
def test_it_cannot_rewrite_history(role_dsn, ended, statement, error):
    identity, token = ended
    with psycopg.connect(role_dsn) as conn:
        with pytest.raises(error):
            conn.execute(statement, {"identity": identity, "token": token})


@pytest.mark.parametrize("statement", [
    """UPDATE agent_token SET "revokedAt" = NULL WHERE "agentIdentityId" = %(identity)s""",
    """UPDATE agent_identity SET status = 'paused' WHERE id = %(identity)s""",
    """UPDATE agent_token SET "expiresAt" = NULL WHERE id = %(token)s""",
])
def test_what_ended_stays_ended_even_for_the_owner(db, ended, statement):
    identity, token = ended
    with pytest.raises(errors.CheckViolation, match="revocation is final|may not live longer"):
        db.execute(statement, {"identity": identity, "token": token})


def test_the_tools_own_endings_still_pass_the_triggers(db, ended):
    """A token's expiry may move earlier, and a live token may be revoked."""
    _, token = ended
    with db.transaction(force_rollback=True):
        db.execute("""UPDATE agent_token SET "expiresAt" = "expiresAt" - interval '1 day',
                      "revokedAt" = timezone('utc', now()) WHERE id = %s""", (token,))


def test_the_documented_kan_server_role_verifies_and_stamps_and_nothing_more(database, ended):
    """docs/security.md's server role: the server's lookup and its lastUsedAt stamp, through the
    two functions made for it, and nothing else: it reads no table, and can lock no row."""
    _, token = ended
    role, password = f"kan_agent_server_{secrets.token_hex(4)}", secrets.token_hex(12)
    block = support.documented_sql(support.SERVER_ROLE_MARKER)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(block.replace("kan_agent_server", role).replace("'change-me'", f"'{password}'"))
        public_id = conn.execute('SELECT "publicId" FROM agent_token WHERE id = %s', (token,)).fetchone()[0]
    try:
        with psycopg.connect(make_conninfo(database, user=role, password=password), autocommit=True) as conn:
            lookup = conn.execute("SELECT * FROM public.agent_token_for_verification(%s::text)",
                                  (public_id,)).fetchone()
            assert lookup is not None and lookup[0].startswith("$argon2id$") and lookup[5] == "active"
            assert conn.execute("SELECT public.agent_token_stamp(%s::text)", (public_id,)).fetchone()[0] is True
            for statement in ("""UPDATE agent_token SET "lastUsedAt" = timezone('utc', now())""",
                              """SELECT id FROM agent_token FOR UPDATE""",
                              """SELECT "tokenHash" FROM agent_token""",
                              """SELECT status FROM agent_identity""",
                              """INSERT INTO agent_audit_event ("publicId", "workspaceId", action)
                                 VALUES ('x', 1, 'x')""",
                              """SELECT "actorEmail" FROM agent_audit_event""",
                              'SELECT email FROM "user"',
                              "SELECT public.agent_lock_workspace(1)"):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(statement)
        with psycopg.connect(database) as conn:
            stamped = conn.execute('SELECT "lastUsedAt" FROM agent_token_use WHERE "agentTokenId" = %s', (token,))
            assert stamped.fetchone() is not None
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')


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


def test_the_documented_upgrade_from_0_3_0_leaves_both_roles_working(server_dsn):
    """A database 0.3.0 made, its two roles made by 0.3.0's own docs/security.md, upgraded
    by this schema and the documented "Upgrading from 0.3.0" SQL: the least-privilege
    role's doctor passes and it changes things; the server role checks and stamps a token
    through its functions, and no longer reads or updates a table."""
    import subprocess

    old_doc = subprocess.run(["git", "show", f"{support.RELEASE_0_3_0}:docs/security.md"], cwd=support.REPO,
                             capture_output=True, text=True, check=True).stdout
    admin, server = f"agent_identity_admin_{secrets.token_hex(4)}", f"kan_agent_server_{secrets.token_hex(4)}"
    password = secrets.token_hex(12)
    dsn = support.released_database(server_dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(support.documented_sql(support.LEAST_PRIVILEGE_MARKER, old_doc)
                         .replace("agent_identity_admin", admin).replace("'change-me'", f"'{password}'"))
            conn.execute(support.documented_sql(support.SERVER_ROLE_MARKER, old_doc)
                         .replace("kan_agent_server", server).replace("'change-me'", f"'{password}'"))
            workspace, owner = support.Kan(conn).managed_workspace()
        admin_dsn = make_conninfo(dsn, user=admin, password=password)
        env = {"AGENT_IDENTITY_ADMIN_EMAIL": owner["email"]}
        created = support.run_released(["create", "--workspace-public-id", workspace["publicId"], "--slug", "old",
                                        "--display-name", "O", "--token-name", "t", "--scopes", "boards:read",
                                        "--confirm", "--json"], admin_dsn, env)
        assert created.code == 0, created.stderr
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(support.run_cli(["schema"], None).stdout)
            conn.execute(support.documented_sql(support.UPGRADE_MARKER)
                         .replace("agent_identity_admin", admin).replace("kan_agent_server", server))
        doctor = support.run_cli(["doctor", "--json"], admin_dsn)
        assert doctor.code == 0, doctor.stdout
        paused = support.run_cli(["pause", "--workspace-public-id", workspace["publicId"], "--slug", "old",
                                  "--confirm"], admin_dsn, env)
        assert paused.code == 0, paused.stderr
        token = created.json["token"]["publicId"]
        with psycopg.connect(make_conninfo(dsn, user=server, password=password), autocommit=True) as conn:
            assert conn.execute("SELECT status FROM public.agent_token_for_verification(%s::text)",
                                (token,)).fetchone() == ("paused",)
            for statement in ("SELECT 1 FROM agent_token", """UPDATE agent_token SET "lastUsedAt" = now()"""):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(statement)
    finally:
        support.drop_database(server_dsn, dsn)
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            for role in (admin, server):
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')
