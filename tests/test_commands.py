"""Every command end to end: the CLI as a subprocess, then the rows it left behind."""

import re
import secrets
from datetime import timedelta

import psycopg
import pytest
from argon2 import PasswordHasher

import agent_identity_admin as tool
from tests import support

IDENTITY_SQL = 'SELECT * FROM agent_identity WHERE "workspaceId" = %s AND slug = %s'
TOKENS_SQL = 'SELECT * FROM agent_token WHERE "agentIdentityId" = %s ORDER BY id'
EVENTS_SQL = 'SELECT * FROM agent_audit_event WHERE "agentIdentityId" = %s ORDER BY id'


def rows(db, query, *params):
    from psycopg.rows import dict_row

    return db.cursor(row_factory=dict_row).execute(query, params).fetchall()


def identity_row(db, operator, slug):
    found = rows(db, IDENTITY_SQL, operator.workspace["id"], slug)
    return found[0] if found else None


# --- create -------------------------------------------------------------------


def test_create_writes_identity_token_and_audit_event(db, operator):
    result = operator.create("release-bot", "--reason", "ticket OPS-1")
    out = result.json
    secret = out["token"]["secret"]
    assert (out["ok"], out["command"], out["dryRun"], out["changed"]) == (True, "create", False, True)
    assert out["identity"]["slug"] == "release-bot"
    assert out["identity"]["status"] == "active"
    assert out["identity"]["workspacePublicId"] == operator.workspace["publicId"]
    assert out["token"]["scopes"] == ["boards:read", "cards:write"]
    assert tool.parse_token(secret) == (out["token"]["publicId"], None)

    identity = identity_row(db, operator, "release-bot")
    assert identity["publicId"] == out["identity"]["publicId"]
    assert out["identity"]["createdAt"] == tool.iso(identity["createdAt"])
    assert (identity["status"], identity["displayName"]) == ("active", "Agent release-bot")
    [token] = rows(db, TOKENS_SQL, identity["id"])
    assert token["publicId"] == out["token"]["publicId"]
    assert token["scopes"] == ["boards:read", "cards:write"]
    assert token["revokedAt"] is None and token["rotatedFromId"] is None
    assert PasswordHasher().verify(token["tokenHash"], secret)

    [event] = rows(db, EVENTS_SQL, identity["id"])
    assert event["action"] == "identity.created"
    assert event["actorEmail"] == operator.email
    assert event["reason"] == "ticket OPS-1"
    assert event["agentTokenId"] == token["id"]
    assert event["workspaceId"] == operator.workspace["id"]
    assert event["metadata"] == {
        "previousStatus": None, "newStatus": "active", "slug": "release-bot",
        "displayName": "Agent release-bot", "scopes": ["boards:read", "cards:write"],
        "tokenPublicId": token["publicId"], "tokenName": "primary", "toolVersion": tool.__version__,
        "expiresIn": "90d", "expiresAt": tool.iso(token["expiresAt"]),
        # what a swapped hash in the table would disagree with (not the hash itself)
        "tokenHashDigest": tool.hash_digest(token["tokenHash"]),
    }
    assert token["expiresAt"] - token["createdAt"] == timedelta(days=90)


def test_the_token_is_printed_once_and_stored_nowhere(db, operator):
    result = operator("create", "--slug", "human", "--display-name", "Human", "--token-name", "t",
                      "--scopes", "cards:read", "--confirm", json=False)
    assert result.code == 0, result.stderr
    [secret_line] = [line for line in result.stdout.splitlines() if "kan_agent_" in line]
    token = secret_line.removeprefix("token: ")
    assert tool.parse_token(token)[1] is None
    assert result.stdout.count(token) == 1
    assert "kan_agent_" not in result.stderr
    assert "shown once" in result.stderr
    everything = support.database_text(db)
    assert token not in everything
    assert token.split("_")[-1] not in everything


def test_create_dry_run_changes_no_table_and_issues_no_token(db, operator):
    before = support.snapshot(db)
    result = operator("create", "--slug", "preview", "--display-name", "Preview", "--token-name", "t",
                      "--scopes", "boards:read", "--dry-run")
    assert result.code == 0, result.stderr
    out = result.json
    assert (out["dryRun"], out["changed"]) == (True, True)
    assert "secret" not in out["token"]
    assert out["token"]["publicId"] is None
    assert out["auditEvent"]["action"] == "identity.created"
    assert "kan_agent_" not in result.stdout + result.stderr
    assert support.snapshot(db) == before


def test_create_dry_run_still_reports_a_taken_slug(operator):
    operator.create("taken")
    result = operator("create", "--slug", "taken", "--display-name", "X", "--token-name", "t",
                      "--scopes", "boards:read", "--dry-run")
    assert result.code == 5


def test_a_taken_slug_is_a_conflict_even_after_revocation(db, operator):
    operator.create("once")
    assert operator("revoke", "--slug", "once", "--confirm").code == 0
    before = support.snapshot(db)
    result = operator("create", "--slug", "once", "--display-name", "Again", "--token-name", "t",
                      "--scopes", "boards:read", "--confirm")
    assert result.code == 5
    assert result.json["error"]["kind"] == "conflict"
    assert "slug once is taken" in result.json["error"]["message"]
    assert support.snapshot(db) == before


def test_the_same_slug_may_exist_in_two_workspaces(kan, cli, operator):
    operator.create("shared-name")
    workspace, admin = kan.managed_workspace()
    support.Operator(cli, workspace, admin["email"]).create("shared-name")


def test_sql_in_values_is_stored_as_data(db, operator):
    name = "Robert'); DROP TABLE agent_identity;--"
    result = operator("create", "--slug", "bobby", "--display-name", name, "--token-name", "t",
                      "--scopes", "boards:read", "--reason", "1' OR '1'='1", "--confirm")
    assert result.code == 0, result.stderr
    assert identity_row(db, operator, "bobby")["displayName"] == name


# --- rotate -------------------------------------------------------------------


def test_rotate_issues_a_new_token_and_revokes_the_old(db, operator):
    first = operator.create("rotor").json["token"]
    result = operator("rotate", "--slug", "rotor", "--reason", "scheduled", "--confirm")
    assert result.code == 0, result.stderr
    out = result.json
    new = out["token"]
    assert new["name"] == "primary" and new["scopes"] == first["scopes"]
    assert new["rotatedFromPublicId"] == first["publicId"]
    assert out["revokedTokenPublicIds"] == [first["publicId"]]

    identity = identity_row(db, operator, "rotor")
    old_row, new_row = rows(db, TOKENS_SQL, identity["id"])
    assert old_row["revokedAt"] is not None and old_row["revokedBy"] is not None
    assert new_row["revokedAt"] is None
    assert new_row["rotatedFromId"] == old_row["id"]
    assert new_row["scopes"] == old_row["scopes"]
    assert PasswordHasher().verify(new_row["tokenHash"], new["secret"])
    assert identity["updatedAt"] is not None

    events = rows(db, EVENTS_SQL, identity["id"])
    assert [e["action"] for e in events] == ["identity.created", "identity.token_rotated"]
    assert events[1]["agentTokenId"] == new_row["id"]
    assert events[1]["reason"] == "scheduled"
    assert events[1]["metadata"]["revokedTokenPublicIds"] == [first["publicId"]]
    assert events[1]["metadata"]["rotatedFromTokenPublicId"] == first["publicId"]
    assert (events[1]["metadata"]["previousStatus"], events[1]["metadata"]["newStatus"]) == ("active", "active")
    assert new["secret"] not in support.database_text(db)


def test_rotate_takes_a_new_token_name(db, operator):
    operator.create("renamed")
    result = operator("rotate", "--slug", "renamed", "--token-name", "ci-2026", "--confirm")
    assert result.json["token"]["name"] == "ci-2026"
    identity = identity_row(db, operator, "renamed")
    assert [t["name"] for t in rows(db, TOKENS_SQL, identity["id"])] == ["primary", "ci-2026"]


def test_rotations_form_a_chain_with_one_live_token(db, operator):
    operator.create("chain")
    for _ in range(3):
        assert operator("rotate", "--slug", "chain", "--confirm").code == 0
    identity = identity_row(db, operator, "chain")
    tokens = rows(db, TOKENS_SQL, identity["id"])
    assert [t["revokedAt"] is None for t in tokens] == [False, False, False, True]
    assert [t["rotatedFromId"] for t in tokens] == [None] + [t["id"] for t in tokens[:-1]]


def test_a_paused_identity_can_rotate_and_stays_paused(db, operator):
    operator.create("sleepy")
    assert operator("pause", "--slug", "sleepy", "--confirm").code == 0
    result = operator("rotate", "--slug", "sleepy", "--confirm")
    assert result.code == 0, result.stderr
    assert result.json["identity"]["status"] == "paused"
    assert identity_row(db, operator, "sleepy")["status"] == "paused"


def test_a_revoked_identity_cannot_rotate(db, operator):
    operator.create("gone")
    operator("revoke", "--slug", "gone", "--confirm")
    before = support.snapshot(db)
    result = operator("rotate", "--slug", "gone", "--confirm")
    assert result.code == 5
    assert "is revoked" in result.json["error"]["message"]
    assert support.snapshot(db) == before


def test_rotate_dry_run_changes_nothing(db, operator):
    operator.create("dry-rotor")
    before = support.snapshot(db)
    result = operator("rotate", "--slug", "dry-rotor", "--dry-run")
    assert result.code == 0
    assert result.json["dryRun"] is True
    assert "secret" not in result.json["token"]
    assert len(result.json["revokedTokenPublicIds"]) == 1
    assert support.snapshot(db) == before


# --- pause, resume, revoke ----------------------------------------------------


def test_pause_resume_revoke_walk_the_states(db, operator):
    token = operator.create("walker").json["token"]
    identity_id = identity_row(db, operator, "walker")["id"]

    paused = operator("pause", "--slug", "walker", "--reason", "odd traffic", "--confirm")
    assert (paused.code, paused.json["changed"], paused.json["identity"]["status"]) == (0, True, "paused")
    row = identity_row(db, operator, "walker")
    assert row["status"] == "paused" and row["pausedAt"] is not None
    assert paused.json["identity"]["pausedAt"] == tool.iso(row["pausedAt"])
    assert paused.json["identity"]["updatedAt"] == tool.iso(row["updatedAt"])

    resumed = operator("resume", "--slug", "walker", "--confirm")
    assert resumed.json["identity"]["status"] == "active"
    row = identity_row(db, operator, "walker")
    assert row["status"] == "active" and row["pausedAt"] is None

    revoked = operator("revoke", "--slug", "walker", "--confirm")
    assert revoked.json["revokedTokenPublicIds"] == [token["publicId"]]
    row = identity_row(db, operator, "walker")
    assert row["status"] == "revoked" and row["revokedAt"] is not None
    assert revoked.json["identity"]["revokedAt"] == tool.iso(row["revokedAt"])
    assert all(t["revokedAt"] is not None for t in rows(db, TOKENS_SQL, identity_id))

    events = rows(db, EVENTS_SQL, identity_id)
    assert [(e["action"], e["metadata"]["previousStatus"], e["metadata"]["newStatus"]) for e in events] == [
        ("identity.created", None, "active"),
        ("identity.paused", "active", "paused"),
        ("identity.resumed", "paused", "active"),
        ("identity.revoked", "active", "revoked"),
    ]
    assert events[1]["reason"] == "odd traffic"
    assert all(e["actorEmail"] == operator.email for e in events)


def test_revoking_a_paused_identity(db, operator):
    operator.create("paused-then-gone")
    operator("pause", "--slug", "paused-then-gone", "--confirm")
    result = operator("revoke", "--slug", "paused-then-gone", "--confirm")
    assert result.code == 0
    assert result.json["previousStatus"] == "paused"
    assert identity_row(db, operator, "paused-then-gone")["status"] == "revoked"


@pytest.mark.parametrize("setup, command, status", [
    ([], "resume", "active"),
    (["pause"], "pause", "paused"),
    (["revoke"], "revoke", "revoked"),
])
def test_asking_for_the_current_state_changes_nothing(db, operator, setup, command, status):
    operator.create("steady")
    for step in setup:
        assert operator(step, "--slug", "steady", "--confirm").code == 0
    before = support.snapshot(db)
    result = operator(command, "--slug", "steady", "--confirm")
    assert result.code == 0
    assert result.json["changed"] is False
    assert result.json["message"] == f"agent identity steady is already {status}; nothing to change"
    assert support.snapshot(db) == before
    human = operator(command, "--slug", "steady", "--confirm", json=False)
    assert human.stdout == f"agent identity steady is already {status}; nothing to change\n"


@pytest.mark.parametrize("command", ["resume", "pause"])
def test_a_revoked_identity_stays_revoked(db, operator, command):
    operator.create("final")
    operator("revoke", "--slug", "final", "--confirm")
    before = support.snapshot(db)
    result = operator(command, "--slug", "final", "--confirm")
    assert result.code == 5
    assert result.json["error"]["message"] == (
        f"cannot {command} agent identity final: it is revoked and revocation is final"
    )
    assert support.snapshot(db) == before


@pytest.mark.parametrize("command", ["pause", "revoke"])
def test_status_dry_run_changes_nothing(db, operator, command):
    operator.create("dry-status")
    before = support.snapshot(db)
    planned = operator(command, "--slug", "dry-status", "--dry-run")
    assert planned.json["identity"]["status"] == {"pause": "paused", "revoke": "revoked"}[command]
    result = operator(command, "--slug", "dry-status", "--dry-run", json=False)
    assert result.code == 0
    assert result.stdout.startswith(f"would {command} agent identity dry-status")
    target = planned.json["target"]
    assert result.stderr == (f"agent-identity: target: {tool.describe_target(target)}\n"
                             "agent-identity: dry run: nothing was written\n")
    assert target["database"] == db.info.dbname
    assert support.snapshot(db) == before


@pytest.mark.parametrize("command", ["rotate", "pause", "resume", "revoke", "inspect"])
def test_an_unknown_slug_is_not_found(operator, command):
    extra = [] if command == "inspect" else ["--confirm"]
    result = operator(command, "--slug", "nobody-here", *extra)
    assert result.code == 3
    assert result.json["error"]["message"] == (
        f"no agent identity nobody-here in workspace {operator.workspace['publicId']}"
    )


# --- inspect and list ---------------------------------------------------------


def test_inspect_shows_tokens_without_hashes_and_the_latest_events(db, operator):
    operator.create("seen")
    operator("rotate", "--slug", "seen", "--confirm")
    operator("pause", "--slug", "seen", "--confirm")
    result = operator("inspect", "--slug", "seen", "--events", "2")
    assert result.code == 0, result.stderr
    identity = result.json["identity"]
    assert identity["status"] == "paused"
    assert [t["live"] for t in identity["tokens"]] == [True, False]
    assert identity["tokens"][0]["rotatedFromPublicId"] == identity["tokens"][1]["publicId"]
    assert set(identity["tokens"][0]) == {
        "publicId", "name", "scopes", "createdAt", "expiresAt", "lastUsedAt", "revokedAt",
        "rotatedFromPublicId", "live", "expiringSoon",
    }
    assert [e["action"] for e in identity["events"]] == ["identity.paused", "identity.token_rotated"]
    assert "argon2" not in result.stdout


def test_inspect_shows_last_used_written_by_the_server(db, operator):
    operator.create("used")
    identity_id = identity_row(db, operator, "used")["id"]
    db.execute(
        """UPDATE agent_token SET "lastUsedAt" = '2026-01-02 03:04:05' WHERE "agentIdentityId" = %s""",
        (identity_id,),
    )
    result = operator("inspect", "--slug", "used")
    assert result.json["identity"]["tokens"][0]["lastUsedAt"] == "2026-01-02T03:04:05Z"
    human = operator("inspect", "--slug", "used", "--wide", json=False)
    assert re.search(r"2026-01-02T03:04:05Z \(\d+ days ago\)", human.stdout), "UTC, and how long ago"
    assert human.stdout.splitlines()[0] == f"identity   used ({identity_row(db, operator, 'used')['publicId']})"


def test_list_is_newest_first_and_filters_by_status(operator):
    for slug in ("first", "second", "third"):
        operator.create(slug)
    operator("pause", "--slug", "second", "--confirm")
    listed = operator("list").json
    assert [i["slug"] for i in listed["identities"]] == ["third", "second", "first"]
    assert [i["liveTokens"] for i in listed["identities"]] == [1, 1, 1]
    paused = operator("list", "--status", "paused").json
    assert [i["slug"] for i in paused["identities"]] == ["second"]
    assert operator("list", "--status", "revoked").json["identities"] == []


def test_list_human_output_is_an_aligned_table(operator):
    operator.create("tabled")
    header, row = operator("list", "--wide", json=False).stdout.splitlines()
    assert header.startswith("SLUG    PUBLIC ID     STATUS  LIVE TOKENS  NEXT EXPIRY")
    assert row.startswith("tabled  ")
    assert row[header.index("STATUS"):].startswith("active  1 ")
    assert re.search(r"\(in (89|90) days\)", row[header.index("NEXT EXPIRY"):].split("  ")[0])


def test_an_empty_workspace_lists_nothing(operator):
    result = operator("list", json=False)
    assert result.stdout == f"no agent identities in workspace {operator.workspace['publicId']}\n"


# --- the database itself ------------------------------------------------------


def test_missing_agent_tables_say_to_apply_the_schema(server_dsn, kan):
    bare = support.create_database(server_dsn, agent_tables=False)
    try:
        import psycopg

        with psycopg.connect(bare, autocommit=True) as conn:
            workspace, admin = support.Kan(conn).managed_workspace()
        result = support.run_cli(
            ["list", "--workspace-public-id", workspace["publicId"]], bare,
            {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]},
        )
        assert result.code == 6
        assert "agent tables are missing" in result.stderr
        assert "agent-identity schema" in result.stderr
        assert len(result.stderr.splitlines()) == 1
    finally:
        support.drop_database(server_dsn, bare)


def test_a_database_without_kan_tables_is_named_as_such(server_dsn, cli):
    import psycopg

    postgres_db = psycopg.conninfo.make_conninfo(server_dsn, dbname="postgres")
    result = cli("list", "--workspace-public-id", "Ab12Cd34Ef56", dsn=postgres_db,
                 env={"AGENT_IDENTITY_ADMIN_EMAIL": "a@example.com"})
    assert result.code == 6
    assert "does not look like a Kan database" in result.stderr


SETTINGS = """SELECT current_setting('TimeZone'), current_setting('application_name'),
                      current_setting('search_path'), current_setting('lock_timeout'),
                      current_setting('statement_timeout'), current_setting('idle_in_transaction_session_timeout')"""


def test_each_transaction_is_utc_named_and_time_limited(database):
    """transaction() sets the zone and the time limits for itself alone; connect() sends only
    the name as a startup parameter and keeps options the URL already has."""
    url = database + " options='-c search_path=public'"
    with tool.connect(url) as conn:
        server_defaults = conn.execute(SETTINGS).fetchone()
        with tool.transaction(conn, lock_timeout=2.5):
            inside = conn.execute(SETTINGS).fetchone()
        after = conn.execute(SETTINGS).fetchone()
    # Inside, names resolve in the catalog alone (the tool names Kan's schema itself).
    assert inside == ("UTC", "agent-identity", "pg_catalog, pg_temp", "2500ms", "32500ms", "1min")
    assert after == server_defaults, "nothing outlives the transaction (a pooler hands the connection on)"
    assert server_defaults[1:3] == ("agent-identity", "public")


def test_the_statement_limit_outlasts_the_longest_lock_wait(database):
    with tool.connect(database) as conn, tool.transaction(conn, lock_timeout=600, read_only=True):
        assert conn.execute(SETTINGS).fetchone()[3:5] == ("10min", "630s")


def test_a_read_transaction_is_read_only(database):
    with tool.connect(database) as conn, tool.transaction(conn, lock_timeout=1, read_only=True):
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TEMPORARY TABLE scratch (id int)")


def test_timestamps_are_utc_whatever_the_database_zone(db, operator):
    db.execute(f'ALTER DATABASE "{db.info.dbname}" SET TimeZone = \'Asia/Tokyo\'')
    try:
        operator.create("utc")
    finally:
        db.execute(f'ALTER DATABASE "{db.info.dbname}" RESET TimeZone')
    created = identity_row(db, operator, "utc")["createdAt"]
    now_utc = db.execute("SELECT timezone('utc', now())").fetchone()[0]
    assert abs((now_utc - created).total_seconds()) < 60


def test_list_pages_with_a_keyset_cursor(operator):
    for n in range(5):
        operator.create(f"page-{n}")
    seen, cursor, pages = [], None, 0
    while True:
        result = operator("list", "--limit", "2", *(["--after", cursor] if cursor else []))
        assert result.code == 0, result.stderr
        seen += [i["slug"] for i in result.json["identities"]]
        cursor, pages = result.json["nextCursor"], pages + 1
        if cursor is None:
            break
    assert seen == [f"page-{n}" for n in reversed(range(5))]
    assert pages == 3
    human = operator("list", "--limit", "2", json=False)
    assert human.stderr.splitlines()[-1].startswith("agent-identity: more: add --after "), "the footer is a note"
    assert "more:" not in human.stdout


def test_list_default_page_is_fifty(operator):
    assert operator("list").json["nextCursor"] is None


@pytest.mark.parametrize("args, code", [(["--limit", "0"], 2), (["--limit", "1001"], 2),
                                         (["--after", "Zz99Zz99Zz99"], 3)])
def test_list_page_arguments_are_checked(operator, args, code):
    result = operator("list", *args)
    assert result.code == code, result.stderr


def test_a_closed_pipe_ends_list_quietly(operator, cli_dsn, monkeypatch):
    """`list | head`: when the reader has gone, the tool stops with exit 141 (as a process killed by
    SIGPIPE would, so `set -o pipefail` sees it) and says nothing."""
    import io

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    operator.create("piped")
    monkeypatch.setenv("DATABASE_URL", cli_dsn)
    monkeypatch.setenv("AGENT_IDENTITY_ADMIN_EMAIL", operator.email)
    stderr = io.StringIO()
    code = tool.main(["list", "--workspace-public-id", operator.workspace["publicId"]], ClosedPipe(), stderr)
    assert (code, stderr.getvalue()) == (141, "")


# --- tables that fit the terminal ------------------------------------------------

LONG_NAME = "Release bot for the quarterly compliance reports of the payments platform"


@pytest.fixture
def crowded(operator, db, kan):
    """An identity with a long name, a long actor email and a long reason."""
    long_email = f"{'a-very-long-mailbox-name-' * 3}{secrets.token_hex(2)}@operations.example.com"
    admin = kan.user(long_email)
    kan.member(operator.workspace, admin)
    operator.cli("create", "--workspace-public-id", operator.workspace["publicId"], "--slug", "crowded-bot",
                 "--display-name", LONG_NAME, "--token-name", "a token with a long and descriptive name",
                 "--scopes", ",".join(tool.SCOPES), "--reason", "ticket OPS-1234 " * 8, "--confirm",
                 env={"AGENT_IDENTITY_ADMIN_EMAIL": long_email})
    operator.create("short")
    return operator


@pytest.mark.parametrize("command", [["list"], ["inspect", "--slug", "crowded-bot"]])
def test_tables_fit_80_columns_and_wide_prints_them_whole(crowded, command):
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": crowded.email}
    w = ["--workspace-public-id", crowded.workspace["publicId"]]
    narrow = crowded.cli(*command, *w, env={**env, "COLUMNS": "80"})
    assert narrow.code == 0, narrow.stderr
    assert max(map(len, narrow.stdout.splitlines())) <= 80, narrow.stdout
    assert "…" in narrow.stdout and "crowded-bot" in narrow.stdout
    wide = crowded.cli(*command, *w, "--wide", env={**env, "COLUMNS": "80"})
    assert LONG_NAME in wide.stdout and max(map(len, wide.stdout.splitlines())) > 80
    roomy = crowded.cli(*command, *w, env={**env, "COLUMNS": "200"})
    assert max(map(len, roomy.stdout.splitlines())) <= 200
    assert len(roomy.stdout) > len(narrow.stdout), "more room shows more"


def test_a_table_that_fits_is_printed_whole(operator):
    operator.create("tiny")
    result = operator.cli("list", "--workspace-public-id", operator.workspace["publicId"],
                          env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email, "COLUMNS": "250"})
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(less than a minute ago\)", result.stdout), result.stdout


def test_fit_table_drops_then_cuts():
    rows = lambda short: [["a" * 30, "b" * 30, "2026-01-01T00:00:00Z (3 days ago)" if not short else "3 days ago"]]
    assert tool.fit_table(["A", "B", "WHEN"], rows, None)[1].endswith("(3 days ago)")
    assert tool.fit_table(["A", "B", "WHEN"], rows, 80)[1].endswith("  3 days ago")
    dropped = tool.fit_table(["A", "B", "WHEN"], rows, 50, drop=("B",))
    assert dropped[0].split() == ["A", "WHEN"]
    cut = tool.fit_table(["A", "B", "WHEN"], rows, 30, drop=("B",), shrink=("A",))
    assert all(len(line) <= 30 for line in cut) and "a" * 17 + "…" in cut[1]
