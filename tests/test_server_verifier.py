"""The server's side, proven: server/verify-agent-token.ts, run by Node, agrees with `verify`.

Skipped where node or npm is absent (and AGENT_IDENTITY_REQUIRE_NODE, which
CI sets, is not). Where they are present, the session installs server/'s
locked dependencies itself (npm ci), so the README's test command is enough.
"""

import json
import subprocess
from pathlib import Path

import psycopg
import pytest

import agent_identity_admin as tool
from tests import support

SERVER = support.SERVER
VERIFIER = SERVER / "verify-agent-token.ts"


def node_verdicts(node_bin: Path, database: str, tokens: list[str]) -> list[dict]:
    """Run the TypeScript verifier over the tokens, connected through libpq's PG* variables."""
    completed = subprocess.run([str(node_bin / "tsx"), str(VERIFIER)], input="\n".join(tokens) + "\n",
                               env=support.node_env(database), capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return [json.loads(line) for line in completed.stdout.splitlines()]


@pytest.fixture(scope="module")
def own_database(server_dsn):
    """A database of this module's own: a token is made to have expired here, behind the
    audit chain's back, which would leave the shared database's chains out of step."""
    dsn = support.create_database(server_dsn)
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


def expire_behind_the_tools_back(conn: psycopg.Connection, token_public_id: str) -> None:
    """Make a token have expired a minute ago, as if made two days ago with an expiry that
    has since passed. The schema refuses an expiry at or before the token's making, and
    any expiry changed without its audit event: this writes past the triggers, as a
    superuser restoring data would (session_replication_role = replica)."""
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        moved = conn.execute("""UPDATE agent_token SET "createdAt" = timezone('utc', now()) - interval '2 days',
                                       "expiresAt" = timezone('utc', now()) - interval '1 minute'
                                WHERE "publicId" = %s""", (token_public_id,)).rowcount
    assert moved == 1


def test_node_and_verify_agree_on_every_token(own_db, own_operator, node_bin, own_database):
    db, operator, database = own_db, own_operator, own_database
    tokens = {}
    first = operator.create("node-rotated").json["token"]["secret"]
    tokens["rotated out"] = first
    tokens["valid"] = operator("rotate", "--slug", "node-rotated", "--confirm").json["token"]["secret"]
    expired = operator.create("node-expired").json["token"]
    expire_behind_the_tools_back(db, expired["publicId"])
    tokens["expired"] = expired["secret"]
    tokens["paused"] = operator.create("node-paused").json["token"]["secret"]
    operator("pause", "--slug", "node-paused", "--confirm")
    tokens["revoked"] = operator.create("node-revoked").json["token"]["secret"]
    operator("revoke", "--slug", "node-revoked", "--confirm")
    tokens["malformed"] = first[:-1]
    tokens["bad checksum"] = first[:-7] + ("A" if first[-7] != "A" else "B") + first[-6:]
    tokens["unknown"] = tool.new_token(tool.new_public_id())
    body = first[: len("kan_agent_") + 13] + "Z" * 43
    tokens["hash mismatch"] = body + tool.token_checksum(body)

    expected = {
        "rotated out": "token_revoked", "valid": None, "expired": "token_expired", "paused": "identity_paused",
        "revoked": "token_revoked", "malformed": "malformed", "bad checksum": "bad_checksum",
        "unknown": "unknown_token", "hash mismatch": "hash_mismatch",
    }
    cli_reasons = {name: operator.verify(token).json["reason"] for name, token in tokens.items()}
    node = dict(zip(tokens, node_verdicts(node_bin, database, list(tokens.values()))))
    node_reasons = {name: None if verdict["valid"] else verdict["reason"] for name, verdict in node.items()}
    assert cli_reasons == expected
    assert node_reasons == expected
    assert node["valid"]["scopes"] == ["boards:read", "cards:write"]
    assert node["valid"]["workspaceId"] == str(operator.workspace["id"])

    db.execute('UPDATE workspace SET "deletedAt" = now() WHERE id = %s', (operator.workspace["id"],))
    try:
        assert operator.verify(tokens["valid"]).json["reason"] == "workspace_deleted"
        assert node_verdicts(node_bin, database, [tokens["valid"]]) == [{"valid": False, "reason": "workspace_deleted"}]
    finally:
        db.execute('UPDATE workspace SET "deletedAt" = NULL WHERE id = %s', (operator.workspace["id"],))


def test_the_verifier_typechecks(node_bin):
    completed = subprocess.run([str(node_bin / "tsc"), "--noEmit", "-p", str(SERVER)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_docs_show_the_verifier_as_it_is():
    """docs/tokens.md quotes server/verify-agent-token.ts whole, so the two cannot drift."""
    doc = (support.REPO / "docs" / "tokens.md").read_text()
    assert "```ts\n" + VERIFIER.read_text() + "```\n" in doc


def test_a_hash_made_the_old_way_still_verifies_and_doctor_counts_it(own_db, own_operator, node_bin, own_database):
    """Tokens hashed with argon2-cffi's defaults (t=3, m=64 MiB, p=4, before 0.2) keep working in
    verify and in the server; doctor counts them; rotating re-hashes with the new parameters.
    (In this module's own database: the stored hash no longer matches its issuing event.)"""
    from argon2 import PasswordHasher

    db, operator, database = own_db, own_operator, own_database

    created = operator.create("old-hash").json["token"]
    old_hash = PasswordHasher().hash(created["secret"])
    assert old_hash.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    # As 0.1 wrote it (what a token is never changes now: this is a hand, past the triggers).
    support.outside_the_tool(db, 'UPDATE agent_token SET "tokenHash" = %s WHERE "publicId" = %s',
                             (old_hash, created["publicId"]))

    assert operator.verify(created["secret"]).json["valid"] is True
    assert node_verdicts(node_bin, database, [created["secret"]])[0]["valid"] is True

    def hashes_check():
        [check] = [c for c in operator.cli("doctor", "--json").json["checks"] if c["name"] == "token hashes"]
        return check["detail"]

    assert hashes_check().startswith("1 live token still carries older, slower argon2 parameters")
    rotated = operator("rotate", "--slug", "old-hash", "--confirm").json["token"]
    new_hash = db.execute('SELECT "tokenHash" FROM agent_token WHERE "publicId" = %s',
                          (rotated["publicId"],)).fetchone()[0]
    assert new_hash.startswith(tool.ARGON2_PHC_PREFIX)
    assert hashes_check().startswith("every live token is hashed with argon2id m=2048 KiB, t=1, p=1")
