"""`agent-identity schema` against a real PostgreSQL: idempotent and matching the contract."""

import pytest

from tests import support

# The columns the Kan server relies on, written out here on purpose rather than
# imported from the tool's EXPECTED_COLUMNS: a change to the tool's schema must
# change this copy too, by hand (test_doctor_expects_exactly_the_contract).
CONTRACT = {
    "agent_identity": {
        "id": "bigint", "publicId": "character varying(12)", "workspaceId": "bigint",
        "slug": "character varying(64)", "displayName": "character varying(255)",
        "status": "agent_identity_status", "createdBy": "uuid",
        "createdAt": "timestamp without time zone", "updatedAt": "timestamp without time zone",
        "pausedAt": "timestamp without time zone", "revokedAt": "timestamp without time zone",
    },
    "agent_token": {
        "id": "bigint", "publicId": "character varying(12)", "agentIdentityId": "bigint",
        "name": "character varying(255)", "tokenHash": "text", "scopes": "text[]",
        "expiresAt": "timestamp without time zone", "lastUsedAt": "timestamp without time zone",
        "createdBy": "uuid", "createdAt": "timestamp without time zone",
        "revokedAt": "timestamp without time zone", "revokedBy": "uuid", "rotatedFromId": "bigint",
        "workspaceId": "bigint",  # its identity's, for row level security (docs/security.md, "Proven actors")
    },
    "agent_audit_event": {
        "id": "bigint", "publicId": "character varying(12)", "workspaceId": "bigint",
        "agentIdentityId": "bigint", "agentTokenId": "bigint", "action": "character varying(64)",
        "actorUserId": "uuid", "actorEmail": "character varying(255)", "reason": "text",
        "metadata": "jsonb", "createdAt": "timestamp without time zone",
        # the audit chain (docs/schema.md)
        "sequence": "bigint", "workspacePublicId": "character varying(12)",
        "identityPublicId": "character varying(12)", "identitySlug": "character varying(64)",
        "tokenPublicId": "character varying(12)", "actorUserUuid": "uuid",
        "previousHash": "character varying(64)", "hash": "character varying(64)",
        "login": "name",  # who wrote it (encoding v2)
    },
    # the server's stamps, and a workspace's turn (docs/schema.md)
    "agent_token_use": {"agentTokenId": "bigint", "lastUsedAt": "timestamp without time zone"},
    "agent_workspace_lock": {"workspaceId": "bigint"},
    # which Kan user each maintainer's own login is (docs/security.md, "Proven actors")
    "agent_maintainer_login": {"login": "name", "userId": "uuid"},
}

COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
"""


@pytest.mark.parametrize("table", sorted(CONTRACT))
def test_columns_match_the_contract(db, table):
    assert dict(db.execute(COLUMNS_SQL, (table,)).fetchall()) == CONTRACT[table]


def test_schema_is_idempotent(db, cli):
    """Applying the output a second time succeeds and changes nothing."""
    before = support.snapshot(db)
    db.execute(cli("schema").stdout)
    assert support.snapshot(db) == before


def test_status_enum_values(db):
    labels = [row[0] for row in db.execute(
        "SELECT unnest(enum_range(NULL::agent_identity_status))::text"
    )]
    assert labels == ["active", "paused", "revoked"]


def test_row_level_security_is_enabled(db):
    rows = db.execute(
        "SELECT relname, relrowsecurity FROM pg_class WHERE relname = ANY(%s) ORDER BY relname",
        (list(CONTRACT),),
    ).fetchall()
    assert rows == [(table, True) for table in sorted(CONTRACT)]


def test_slug_is_unique_per_workspace_and_events_are_indexed_newest_first(db):
    indexes = dict(db.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename LIKE 'agent_%'"
    ).fetchall())
    assert 'UNIQUE INDEX agent_identity_workspace_slug_unique ON public.agent_identity USING btree ("workspaceId", slug)' in indexes[
        "agent_identity_workspace_slug_unique"]
    assert '("agentIdentityId", "createdAt" DESC, id DESC)' in indexes["agent_audit_event_identity_created_idx"]


def test_deleting_a_workspace_cascades(db, operator):
    """Kan hard-deletes nothing, but if a workspace row goes, its agents go with it."""
    operator.create("doomed")
    db.execute("DELETE FROM workspace_members WHERE \"workspaceId\" = %s", (operator.workspace["id"],))
    db.execute("DELETE FROM workspace WHERE id = %s", (operator.workspace["id"],))
    count = db.execute(
        "SELECT count(*) FROM agent_identity WHERE \"workspaceId\" = %s", (operator.workspace["id"],)
    ).fetchone()[0]
    assert count == 0


def test_doctor_expects_exactly_the_contract():
    """doctor's idea of the agent tables is the contract the DDL above is checked against."""
    import agent_identity_admin as tool

    assert tool.EXPECTED_COLUMNS == CONTRACT
