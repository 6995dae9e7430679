"""The Kan server's side against a hostile session (issue #19).

The server's role of docs/security.md has EXECUTE on two functions and no grant on any
table: server/verify-agent-token.ts calls them by their schema-qualified names, so

- its verdicts are `agent-identity verify`'s, and it stamps "lastUsedAt" through the
  function alone; as that role nothing else of the tables can be read, written or
  locked, and no lock it can take holds the tool up;
- a temporary agent_token or agent_identity that a session planted, which a
  transaction-mode PgBouncer hands on with the server connection to the role's next
  client, answers nothing: a revoked token stays revoked;

and server/verify-audit-chain.ts reads "createdAt" in a form no session setting changes
(DateStyle, TimeZone), years below 1000 included.

Node tests skip only where node or npm is absent (and AGENT_IDENTITY_REQUIRE_NODE is not
set); the PgBouncer ones also where pgbouncer is absent (unless
AGENT_IDENTITY_REQUIRE_PGBOUNCER is set).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import agent_identity_admin as tool
from tests import support

VERIFIER = support.SERVER / "verify-agent-token.ts"
CHAIN_VERIFIER = support.SERVER / "verify-audit-chain.ts"
CHAIN_LOCK = "agent_audit_event chain"  # the advisory lock's key of 0.3.0's chain (docs/schema.md)

# The lookup server/verify-agent-token.ts made before issue #19: unqualified names, which
# a session's temporary tables come before.
OLD_LOOKUP = """
  SELECT t."tokenHash", t.scopes,
         t."revokedAt" IS NOT NULL AS revoked,
         t."expiresAt" IS NOT NULL AND t."expiresAt" <= timezone('utc', now()) AS expired,
         i."publicId" AS "identityPublicId", i.status, i."workspaceId",
         w."deletedAt" IS NOT NULL AS "workspaceDeleted"
  FROM agent_token t
  JOIN agent_identity i ON i.id = t."agentIdentityId"
  JOIN workspace w ON w.id = i."workspaceId"
  WHERE t."publicId" = %s"""


# --- a database of this module's own, set up as docs/security.md says -----------------


@pytest.fixture(scope="module")
def own_database(server_dsn):
    """A database of this module's own (its tokens are made to expire, and its events
    restored, behind the tool's back), where, as docs/security.md's least-privilege block
    does, no role but the owner may create temporary tables or objects in public."""
    dsn = support.create_database(server_dsn)
    name = conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'REVOKE TEMPORARY ON DATABASE "{name}" FROM PUBLIC')
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    yield dsn
    support.drop_database(server_dsn, dsn)


@pytest.fixture
def own_db(own_database):
    with psycopg.connect(own_database, autocommit=True) as conn:
        yield conn


@pytest.fixture
def own_operator(own_db, own_database):
    """The admin of a fresh workspace of own_database, running the CLI as the owner."""
    return support.owner_operator(own_db, own_database)


class Role:
    """A login role: its name, password and a DSN connecting as it."""

    def __init__(self, name: str, password: str, dsn: str):
        self.name, self.password, self.dsn = name, password, dsn


@pytest.fixture(scope="module")
def server_role(own_database):
    """docs/security.md's server role, made from its block as written but for the role's
    name and password."""
    name, password = f"kan_agent_server_{secrets.token_hex(4)}", secrets.token_hex(12)
    block = support.documented_sql(support.SERVER_ROLE_MARKER)
    assert "GRANT SELECT" not in block and "GRANT UPDATE" not in block, "the server role has no table grant"
    with psycopg.connect(own_database, autocommit=True) as conn:
        conn.execute(block.replace("kan_agent_server", name).replace("'change-me'", f"'{password}'"))
    try:
        yield Role(name, password, make_conninfo(own_database, user=name, password=password))
    finally:
        with psycopg.connect(own_database, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{name}"')
            conn.execute(f'DROP ROLE "{name}"')


# --- running server/'s tools ----------------------------------------------------------


def node(node_bin: Path, script: Path | str, *args: str, dsn: str, input: str | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(node_bin / "tsx"), str(script), *args], input=input,
                          env={**support.node_env(dsn), **(env or {})}, capture_output=True, text=True,
                          timeout=120)


def node_verdicts(node_bin: Path, dsn: str, tokens: list[str], env: dict[str, str] | None = None) -> list[dict]:
    """server/verify-agent-token.ts run as a script: one verdict per token (it stamps the valid ones)."""
    completed = node(node_bin, VERIFIER, dsn=dsn, input="\n".join(tokens) + "\n", env=env)
    assert completed.returncode == 0, completed.stderr
    verdicts = [json.loads(line) for line in completed.stdout.splitlines()]
    assert len(verdicts) == len(tokens)
    return verdicts


def chain_lines(node_bin: Path, dsn: str, workspace: dict, env: dict[str, str] | None = None) -> list[dict]:
    completed = node(node_bin, CHAIN_VERIFIER, workspace["publicId"], dsn=dsn, env=env)
    assert completed.returncode == 0, completed.stderr
    return [json.loads(line) for line in completed.stdout.splitlines()]


def behind_the_tools_back(conn: psycopg.Connection, statement: str, params: tuple) -> None:
    """One change past the schema's triggers (its audit event and time checks), as a
    superuser restoring data would, with session_replication_role = replica."""
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        assert conn.execute(statement, params).rowcount == 1


def last_used(conn: psycopg.Connection, token_public_id: str) -> datetime | None:
    """The token's last use as the tool reads it: the server's stamp (agent_token_use)."""
    return conn.execute("""SELECT greatest(t."lastUsedAt", u."lastUsedAt") FROM agent_token t
                           LEFT JOIN agent_token_use u ON u."agentTokenId" = t.id WHERE t."publicId" = %s""",
                        (token_public_id,)).fetchone()[0]


def public_id(token: str) -> str:
    return token[len("kan_agent_"):len("kan_agent_") + 12]


# --- (a) the documented server role ---------------------------------------------------


def test_as_the_documented_role_node_gives_verify_s_verdicts_and_stamps_through_the_function(
        own_db, own_operator, server_role, node_bin):
    operator, db = own_operator, own_db
    tokens = {}
    first = operator.create("hard-rotated").json["token"]["secret"]
    tokens["rotated out"] = first
    tokens["valid"] = operator("rotate", "--slug", "hard-rotated", "--confirm").json["token"]["secret"]
    tokens["expired"] = operator.create("hard-expired").json["token"]["secret"]
    behind_the_tools_back(db, """UPDATE agent_token SET "createdAt" = timezone('utc', now()) - interval '2 days',
                                        "expiresAt" = timezone('utc', now()) - interval '1 minute'
                                 WHERE "publicId" = %s""", (public_id(tokens["expired"]),))
    tokens["paused"] = operator.create("hard-paused").json["token"]["secret"]
    assert operator("pause", "--slug", "hard-paused", "--confirm").code == 0
    tokens["revoked"] = operator.create("hard-revoked").json["token"]["secret"]
    assert operator("revoke", "--slug", "hard-revoked", "--confirm").code == 0
    # An identity revoked while its token was not (only past the tool: revoke ends both).
    tokens["identity revoked"] = operator.create("hard-ended").json["token"]["secret"]
    behind_the_tools_back(db, """UPDATE agent_identity SET status = 'revoked', "revokedAt" = timezone('utc', now())
                                 WHERE slug = 'hard-ended' AND "workspaceId" = %s""", (operator.workspace["id"],))
    tokens["malformed"] = first[:-1]
    tokens["bad checksum"] = first[:-7] + ("A" if first[-7] != "A" else "B") + first[-6:]
    tokens["unknown"] = tool.new_token(tool.new_public_id())
    body = first[: len("kan_agent_") + 13] + "Z" * 43
    tokens["hash mismatch"] = body + tool.token_checksum(body)  # the rotated-out token's id, a wrong secret
    # A token of a deleted workspace.
    other, admin = support.Kan(db).managed_workspace()
    elsewhere = support.Operator(operator.cli, other, admin["email"])
    tokens["workspace deleted"] = elsewhere.create("hard-gone").json["token"]["secret"]
    db.execute('UPDATE workspace SET "deletedAt" = now() WHERE id = %s', (other["id"],))

    expected = {
        "rotated out": "token_revoked", "valid": None, "expired": "token_expired", "paused": "identity_paused",
        "revoked": "token_revoked", "identity revoked": "identity_revoked", "malformed": "malformed",
        "bad checksum": "bad_checksum", "unknown": "unknown_token", "hash mismatch": "hash_mismatch",
        "workspace deleted": "workspace_deleted",
    }
    known = [public_id(tokens[name]) for name in ("rotated out", "valid", "expired", "paused", "revoked",
                                                  "identity revoked", "workspace deleted")]
    assert {last_used(db, token) for token in known} == {None}

    # Each token checked by an admin of its workspace (to anyone else, verify says unknown_token).
    cli_reasons = {name: (elsewhere if name == "workspace deleted" else operator).verify(token).json["reason"]
                   for name, token in tokens.items()}
    before = db.execute("SELECT timezone('utc', now())").fetchone()[0]
    verdicts = dict(zip(tokens, node_verdicts(node_bin, server_role.dsn, list(tokens.values()))))
    node_reasons = {name: None if v["valid"] else v["reason"] for name, v in verdicts.items()}
    assert cli_reasons == expected
    assert node_reasons == expected
    valid = operator.verify(tokens["valid"]).json
    assert verdicts["valid"] == {
        "valid": True, "tokenPublicId": public_id(tokens["valid"]), "identityPublicId": valid["identity"]["publicId"],
        "workspaceId": str(operator.workspace["id"]), "scopes": ["boards:read", "cards:write"],
    }

    # The valid token was stamped, by the database's clock, and no other: not the rotated-out
    # token whose id the wrong secret carried, nor any token that was refused.
    stamped = last_used(db, public_id(tokens["valid"]))
    assert stamped is not None and before <= stamped <= before + timedelta(minutes=1)
    assert {token: last_used(db, token) for token in known if token != public_id(tokens["valid"])} == \
        {token: None for token in known if token != public_id(tokens["valid"])}
    # The role could not have written it itself.
    with psycopg.connect(server_role.dsn, autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("""UPDATE agent_token SET "lastUsedAt" = timezone('utc', now())""")


def test_the_library_stamps_only_when_asked(own_db, own_operator, server_role, node_bin, tmp_path):
    """verifyAgentToken() stamps with { stamp: true } only; stampLastUsed() says whether
    there was a token to stamp."""
    token = own_operator.create("hard-library").json["token"]["secret"]
    probe = tmp_path / "probe.mts"
    probe.write_text(f"""
import {{ createRequire }} from "node:module";
import {{ stampLastUsed, verifyAgentToken }} from {json.dumps(str(VERIFIER))};
const pg = createRequire({json.dumps(str(support.SERVER / "package.json"))})("pg");
let input = "";
for await (const chunk of process.stdin) input += chunk;
const token = input.trim();
const db = new pg.Client();
await db.connect();
const step = process.argv[2];
let result;
if (step === "plain") result = await verifyAgentToken(db, token);
else if (step === "stamp") result = await verifyAgentToken(db, token, {{ stamp: true }});
else result = [await stampLastUsed(db, token.slice(10, 22)), await stampLastUsed(db, "000000000000")];
await db.end();
console.log(JSON.stringify(result));
""")

    def run(step: str):
        completed = node(node_bin, probe, step, dsn=server_role.dsn, input=token + "\n")
        assert completed.returncode == 0, completed.stderr
        return json.loads(completed.stdout)

    assert run("plain")["valid"] is True
    assert last_used(own_db, public_id(token)) is None
    assert run("stamp")["valid"] is True
    first = last_used(own_db, public_id(token))
    assert first is not None
    assert run("stampLastUsed") == [True, False]
    assert last_used(own_db, public_id(token)) > first


@pytest.mark.parametrize("statement", [
    'SELECT "publicId" FROM agent_token FOR UPDATE',
    'SELECT 1 FROM agent_token WHERE "publicId" = \'x\' FOR NO KEY UPDATE',
    """UPDATE agent_token SET "lastUsedAt" = timezone('utc', now())""",
    'SELECT "tokenHash" FROM agent_token',
    "SELECT status FROM agent_identity",
    'SELECT "actorEmail" FROM agent_audit_event',
    'SELECT "workspaceId" FROM agent_workspace_lock',
    'SELECT 1 FROM agent_workspace_lock FOR UPDATE',
    'SELECT "deletedAt" FROM workspace',
    "LOCK TABLE agent_token IN ACCESS SHARE MODE",
    "SELECT agent_lock_workspace(1)",
    "CREATE TABLE agent_token_lookalike (id int)",
    "CREATE TEMPORARY TABLE agent_token (id int)",
])
def test_as_the_documented_role_nothing_else_is_readable_writable_or_lockable(server_role, statement):
    with psycopg.connect(server_role.dsn) as conn:  # in a transaction, as LOCK TABLE needs
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(statement)


def test_the_documented_role_may_call_the_two_functions(server_role, own_db, own_operator):
    """What the role may call, it calls by its full name: the functions run as the owner."""
    token = own_operator.create("hard-direct").json["token"]
    with psycopg.connect(server_role.dsn, autocommit=True) as conn:
        row = conn.execute("SELECT revoked, expired, status, \"workspaceId\", \"tokenHash\" LIKE '$argon2id$%%' "
                           "FROM public.agent_token_for_verification(%s::pg_catalog.text)",
                           (token["publicId"],)).fetchone()
        assert row == (False, False, "active", own_operator.workspace["id"], True)
        assert conn.execute("SELECT public.agent_token_stamp(%s::pg_catalog.text)", (token["publicId"],)).fetchone() \
            == (True,)
        assert conn.execute("SELECT public.agent_token_stamp('000000000000'::pg_catalog.text)").fetchone() == (False,)
    assert last_used(own_db, token["publicId"]) is not None


def test_no_lock_the_documented_role_takes_holds_the_tool_up(own_db, own_operator, server_role):
    """The chain's advisory lock of 0.3.0 and every lock on the tables: as the server's role,
    none can be had, or none is the tool's, so a pause goes through in --lock-timeout 2."""
    operator = own_operator
    operator.create("hard-held")
    workspace_id = operator.workspace["id"]
    with psycopg.connect(server_role.dsn, autocommit=True) as held:
        held.execute("SELECT pg_advisory_lock(hashtext(%s), %s)", (CHAIN_LOCK, workspace_id % 2147483647))
        held.execute("SELECT pg_advisory_lock(%s)", (workspace_id,))
        # And a transaction left open after the server's lookup, its tables' locks held.
        held.execute("BEGIN")
        held.execute("SELECT * FROM public.agent_token_for_verification(%s::pg_catalog.text)",
                     (tool.new_public_id(),))
        pid = held.execute("SELECT pg_backend_pid()").fetchone()[0]
        locks = own_db.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND granted",
                               (pid,)).fetchone()[0]
        assert locks == 2, "the role holds the advisory locks"

        started = time.monotonic()
        paused = operator("pause", "--slug", "hard-held", "--confirm", "--lock-timeout", "2")
        elapsed = time.monotonic() - started
        held.execute("ROLLBACK")
    assert paused.code == 0, paused.stderr + paused.stdout
    assert paused.json["identity"]["status"] == "paused"
    assert elapsed < 2 + 10, "it did not wait out its lock timeout and more"
    assert operator("inspect", "--slug", "hard-held").json["identity"]["status"] == "paused"


def test_a_stamp_held_open_does_not_hold_up_a_revocation(own_db, own_operator, server_role):
    """The stamp is a row of agent_token_use: a server that stamps in a transaction it keeps
    open holds only a key share of the token's row, which a revocation does not wait for."""
    operator = own_operator
    token = operator.create("hard-stamped").json["token"]
    with psycopg.connect(server_role.dsn, autocommit=True) as held:
        held.execute("BEGIN")
        assert held.execute("SELECT public.agent_token_stamp(%s::pg_catalog.text)",
                            (token["publicId"],)).fetchone() == (True,)
        revoked = operator("revoke", "--slug", "hard-stamped", "--confirm", "--lock-timeout", "2")
        held.execute("ROLLBACK")
    assert revoked.code == 0, revoked.stdout
    assert own_db.execute('SELECT "revokedAt" IS NOT NULL FROM agent_token WHERE "publicId" = %s',
                          (token["publicId"],)).fetchone() == (True,)


# --- (b) a temporary table planted on a pooled server connection ----------------------


def test_a_planted_temporary_table_on_a_pooled_connection_answers_nothing(own_db, own_operator, server_role,
                                                                         own_database, node_bin):
    operator, db = own_operator, own_db
    revoked = operator.create("hard-planted").json["token"]
    assert operator("revoke", "--slug", "hard-planted", "--confirm").code == 0
    live = operator.create("hard-pooled").json["token"]["secret"]
    real = db.execute("""SELECT t.id, t."agentIdentityId", t."tokenHash", i."publicId", i."workspaceId"
                         FROM agent_token t JOIN agent_identity i ON i.id = t."agentIdentityId"
                         WHERE t."publicId" = %s""", (revoked["publicId"],)).fetchone()
    token_id, identity_id, token_hash, identity_public_id, workspace_id = real
    # The server's role, allowed temporary tables (docs/security.md takes them from PUBLIC).
    name = conninfo_to_dict(own_database)["dbname"]
    db.execute(sql.SQL("GRANT TEMPORARY ON DATABASE {} TO {}").format(sql.Identifier(name),
                                                                       sql.Identifier(server_role.name)))
    try:
        with support.pgbouncer(own_database, pool_size=1, users={server_role.name: server_role.password}) as pooled:
            pooled_role = make_conninfo(pooled, user=server_role.name, password=server_role.password)
            # prepare_threshold=None: no named prepared statement, which a transaction pool cannot keep.
            with psycopg.connect(pooled_role, autocommit=True, prepare_threshold=None) as planter:
                planter.execute(sql.SQL("""
                    CREATE TEMP TABLE agent_token AS
                    SELECT {token_id}::bigint AS id, {public_id}::varchar AS "publicId",
                           {identity_id}::bigint AS "agentIdentityId", {hash}::text AS "tokenHash",
                           '{{boards:read}}'::text[] AS scopes, NULL::timestamp AS "expiresAt",
                           NULL::timestamp AS "revokedAt";
                    CREATE TEMP TABLE agent_identity AS
                    SELECT {identity_id}::bigint AS id, {identity_public_id}::varchar AS "publicId",
                           {workspace_id}::bigint AS "workspaceId", 'active'::text AS status;
                    CREATE TEMP TABLE workspace AS
                    SELECT {workspace_id}::bigint AS id, NULL::timestamp AS "deletedAt"
                """).format(token_id=token_id, public_id=revoked["publicId"], identity_id=identity_id,
                            hash=token_hash, identity_public_id=identity_public_id, workspace_id=workspace_id))
                planted_on = planter.execute("SELECT pg_backend_pid()").fetchone()[0]

            # Another client of the pool gets the same server connection, the plant with it:
            # the lookup the server made before read it, and called the revoked token live.
            with psycopg.connect(pooled_role, autocommit=True, prepare_threshold=None) as next_client:
                assert next_client.execute("SELECT pg_backend_pid()").fetchone()[0] == planted_on
                assert next_client.execute("SELECT to_regclass('pg_temp.agent_token') IS NOT NULL, "
                                           "to_regclass('pg_temp.agent_identity') IS NOT NULL").fetchone() \
                    == (True, True)
                fooled = next_client.execute(OLD_LOOKUP, (revoked["publicId"],)).fetchone()
                assert fooled is not None and fooled[2:6] == (False, False, identity_public_id, "active")

            verdicts = node_verdicts(node_bin, pooled_role, [revoked["secret"], live])
            assert verdicts[0] == {"valid": False, "reason": "token_revoked"}
            assert verdicts[1]["valid"] is True

            # The verifier ran on that connection, the plant still in it.
            with psycopg.connect(pooled_role, autocommit=True, prepare_threshold=None) as after:
                assert after.execute("SELECT pg_backend_pid(), to_regclass('pg_temp.agent_token') IS NOT NULL"
                                     ).fetchone() == (planted_on, True)
            backends = db.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                  (server_role.name,)).fetchone()[0]
            assert backends == 1, "one server connection for the role: the plant's"
        assert last_used(db, public_id(live)) is not None
        assert last_used(db, revoked["publicId"]) is None
    finally:
        db.execute(sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM {}").format(sql.Identifier(name),
                                                                            sql.Identifier(server_role.name)))


# --- (c) the audit chain, whatever the session's settings -----------------------------


@pytest.fixture(scope="module")
def chains(own_database):
    """Two workspaces' chains: one the tool wrote; one that begins with an event restored
    from the year 999, linked and hashed as the spec says, then goes on as the tool wrote it."""
    with psycopg.connect(own_database, autocommit=True) as conn:
        kan = support.Kan(conn)
        written, admin = kan.managed_workspace()
        restored, restored_admin = kan.managed_workspace()

    def cli(*args: str, env: dict[str, str] | None = None, dsn: str = own_database,
            input: str | None = None) -> support.Run:
        return support.run_cli(list(args), dsn, env, input=input)

    operator = support.Operator(cli, written, admin["email"])
    operator.create("chained")
    assert operator("rotate", "--slug", "chained", "--confirm").code == 0
    assert operator("pause", "--slug", "chained", "--confirm", "--reason", "Straße, 夜").code == 0

    event = {
        "sequence": 1, "workspacePublicId": restored["publicId"], "publicId": tool.new_public_id(),
        "action": "access.denied", "identityPublicId": None, "identitySlug": None, "tokenPublicId": None,
        "actorUserUuid": None, "actorEmail": "restorer@example.com", "reason": "restored",
        "metadata": '{"restored": true}', "createdAt": datetime(999, 1, 2, 3, 4, 5, 678901),
    }
    event_hash = tool.chain_hash(tool.CHAIN_START, event)
    with psycopg.connect(own_database, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO agent_audit_event ("publicId", "workspaceId", action, "actorEmail", reason, metadata,
                                           "createdAt", "sequence", "workspacePublicId", "previousHash", hash)
            VALUES (%s, %s, %s, %s, %s, %s, %s, 1, %s, %s, %s)""",
            (event["publicId"], restored["id"], event["action"], event["actorEmail"], event["reason"],
             event["metadata"], event["createdAt"], restored["publicId"], tool.CHAIN_START, event_hash))
        kept = conn.execute("""SELECT "createdAt", hash, "sequence" FROM agent_audit_event WHERE "publicId" = %s""",
                            (event["publicId"],)).fetchone()
    assert kept == (event["createdAt"], event_hash, 1), "the trigger kept the restored event as it came"
    support.Operator(cli, restored, restored_admin["email"]).create("after-restore")
    return {"written": written, "restored": restored}


def stored_chain(conn: psycopg.Connection, workspace: dict) -> list[tuple]:
    return conn.execute("""SELECT "sequence", hash, "createdAt" FROM agent_audit_event
                           WHERE "workspaceId" = %s AND "sequence" IS NOT NULL ORDER BY "sequence" """,
                        (workspace["id"],)).fetchall()


SESSION_SETTINGS = {
    "default": None,
    "German": "-c DateStyle=German",
    "SQL, DMY": "-c DateStyle=SQL,DMY",
    "Postgres, MDY": "-c DateStyle=Postgres,MDY",
    "Kiritimati": "-c TimeZone=Pacific/Kiritimati",
}


@pytest.mark.parametrize("setting", SESSION_SETTINGS)
def test_the_node_chain_verifier_agrees_whatever_the_session_s_settings(own_database, own_db, chains, node_bin,
                                                                         setting, tmp_path):
    options = SESSION_SETTINGS[setting]
    env = {"PGOPTIONS": options} if options else {}
    # The setting reaches node-postgres's session (it reads PGOPTIONS), and changes what
    # a timestamp's plain text would have been.
    probe = tmp_path / "probe.mts"
    probe.write_text(f"""
import {{ createRequire }} from "node:module";
const pg = createRequire({json.dumps(str(support.SERVER / "package.json"))})("pg");
const db = new pg.Client();
await db.connect();
const {{ rows }} = await db.query(`SELECT current_setting('DateStyle') AS "dateStyle",
    current_setting('TimeZone') AS "timeZone", timestamp '0999-01-02 03:04:05.5'::text AS text`);
await db.end();
console.log(JSON.stringify(rows[0]));
""")
    completed = node(node_bin, probe, dsn=own_database, env=env)
    assert completed.returncode == 0, completed.stderr
    session = json.loads(completed.stdout)
    if setting == "Kiritimati":
        assert session["timeZone"] == "Pacific/Kiritimati"
    elif setting != "default":
        assert (session["dateStyle"], session["text"]) == {
            "German": ("German, DMY", "02.01.0999 03:04:05.5"),
            "SQL, DMY": ("SQL, DMY", "02/01/0999 03:04:05.5"),
            "Postgres, MDY": ("Postgres, MDY", "Wed Jan 02 03:04:05.5 0999"),
        }[setting]

    for name, workspace in chains.items():
        *lines, summary = chain_lines(node_bin, own_database, workspace, env=env)
        stored = stored_chain(own_db, workspace)
        assert [(line["sequence"], line["hash"]) for line in lines] == [(s, h) for s, h, _ in stored], name
        assert all(line["linked"] for line in lines), name
        assert summary == {"intact": True, "events": len(stored), "head": f"{stored[-1][0]}:{stored[-1][1]}"}, name
    assert stored_chain(own_db, chains["restored"])[0][2] == datetime(999, 1, 2, 3, 4, 5, 678901)


# --- the schema, from AGENT_IDENTITY_DB_SCHEMA ----------------------------------------


@pytest.fixture
def kan_elsewhere(server_dsn):
    """A database whose Kan and agent tables are in schema kan_app, public left empty."""
    name = f"agent_identity_test_{secrets.token_hex(6)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server_dsn, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA kan_app")
            conn.execute("SET search_path = kan_app")
            conn.execute(support.KAN_SCHEMA.read_text())
            conn.execute(support.run_cli(["schema", "--db-schema", "kan_app"], None).stdout)
        yield dsn
    finally:
        support.drop_database(server_dsn, dsn)


def test_both_verifiers_use_the_schema_agent_identity_db_schema_names(kan_elsewhere, node_bin):
    with psycopg.connect(kan_elsewhere, autocommit=True, options="-c search_path=kan_app") as conn:
        workspace, admin = support.Kan(conn).managed_workspace()
    in_kan_app = {"AGENT_IDENTITY_DB_SCHEMA": "kan_app"}

    def cli(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> support.Run:
        return support.run_cli(list(args), kan_elsewhere, {**in_kan_app, **(env or {})}, input=input)

    token = support.Operator(cli, workspace, admin["email"]).create("schemed").json["token"]
    with psycopg.connect(kan_elsewhere, autocommit=True) as conn:
        events = conn.execute("""SELECT "sequence", hash FROM kan_app.agent_audit_event WHERE "workspaceId" = %s
                                 ORDER BY "sequence" """, (workspace["id"],)).fetchall()
        assert conn.execute("SELECT to_regclass('public.agent_token')").fetchone() == (None,)

    assert node_verdicts(node_bin, kan_elsewhere, [token["secret"]], env=in_kan_app)[0]["valid"] is True
    *lines, summary = chain_lines(node_bin, kan_elsewhere, workspace, env=in_kan_app)
    assert [(line["sequence"], line["hash"]) for line in lines] == events
    assert summary["intact"] is True and summary["events"] == len(events) > 0

    # Not found where the schema is not (public, the default, holds none of it).
    runs = {
        "function public.agent_token_for_verification(text) does not exist": (VERIFIER, (), token["secret"] + "\n"),
        'relation "public.agent_audit_event" does not exist': (CHAIN_VERIFIER, (workspace["publicId"],), None),
    }
    for error, (script, args, stdin) in runs.items():
        missing = node(node_bin, script, *args, dsn=kan_elsewhere, input=stdin)
        assert (missing.returncode, missing.stdout) == (1, "")
        assert error in missing.stderr, missing.stderr
        # Nothing but a plain identifier is taken for a name, and nothing is run with one.
        for bad in ('kan_app"; SELECT pg_sleep(1); --', "kan-app", "pg_catalog"):
            refused = node(node_bin, script, *args, dsn=kan_elsewhere, input=stdin,
                           env={"AGENT_IDENTITY_DB_SCHEMA": bad})
            assert (refused.returncode, refused.stdout) == (1, ""), bad
            assert "is not a schema name" in refused.stderr, refused.stderr
