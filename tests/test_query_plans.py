"""Every statement the tool sends uses an index on a grown database: EXPLAIN shows no
sequential scan of the agent tables or workspace_members (Kan's table, which the
index of `agent-identity schema` serves)."""

import io
import os
from unittest import mock

import psycopg
import pytest

import agent_identity_admin as tool
from tests import support

WATCHED = {"agent_identity", "agent_token", "agent_audit_event", "workspace_members"}
GROWN = {"identities": 2_000, "tokens": 20_000, "events": 100_000}


@pytest.fixture(scope="module")
def grown(server_dsn):
    """A database of its own: one workspace grown large, among many members elsewhere."""
    dsn = support.create_database(server_dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        kan = support.Kan(conn)
        workspace, admin = kan.managed_workspace()
        crowd = kan.workspace()
        conn.execute("""
            WITH users AS (
                INSERT INTO "user" (email, "emailVerified")
                SELECT 'crowd-' || g || '@example.com', true FROM generate_series(1, 5000) AS g
                RETURNING id)
            INSERT INTO workspace_members ("publicId", email, "userId", "workspaceId", "createdBy", role, status)
            SELECT 'M' || lpad(to_hex(row_number() OVER ()), 11, '0'), 'crowd', id, %s, id, 'member', 'active'
            FROM users""", (crowd["id"],))
        support.seed_scale(conn, workspace["id"], **GROWN)
        # Others' identities, nine in ten of the table: a command that judges every identity
        # it manages (expiring's down ones) must read its own by index, not the table whole.
        support.outside_the_tool(conn, """
            INSERT INTO agent_identity ("publicId", "workspaceId", slug, "displayName", status)
            SELECT 'C' || lpad(to_hex(g), 11, '0'), %s, 'crowd-' || g, 'Crowd ' || g, 'active'
            FROM generate_series(1, 18000) AS g""", (crowd["id"],))
        conn.execute("ANALYZE")
    yield dsn, workspace, admin["email"]
    support.drop_database(server_dsn, dsn)


def plans_of(argv, dsn, email, stdin="", analyze=False):
    """Run main() in-process, EXPLAINing each statement (with its values) before it runs;
    with analyze, running it too (for reads: what each node actually read)."""
    real_execute = psycopg.Cursor.execute
    plans = []

    def explaining(cursor, query, params=None, **kwargs):
        text = query.as_string(cursor.connection) if hasattr(query, "as_string") else query
        if not text.strip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK")):
            explain = "EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON) " if analyze else "EXPLAIN (VERBOSE, FORMAT JSON) "
            row = real_execute(cursor, explain + text, params).fetchone()
            plans.append((text, row["QUERY PLAN"] if isinstance(row, dict) else row[0]))
        return real_execute(cursor, query, params, **kwargs)

    with mock.patch.object(psycopg.Cursor, "execute", explaining), \
            mock.patch.dict(os.environ, {"DATABASE_URL": dsn, "AGENT_IDENTITY_ADMIN_EMAIL": email}), \
            mock.patch("sys.stdin", io.StringIO(stdin)):
        code = tool.main(argv, io.StringIO(), io.StringIO())
    return code, plans


def scans(plan: dict):
    yield plan["Node Type"], plan.get("Relation Name")
    for child in plan.get("Plans", []):
        yield from scans(child)


# The commands whose statements these tests EXPLAIN (tests/test_meta.py holds every
# database command to it): each line of test_every_command_uses_indexes, and workspaces.
COVERED = ("inspect", "list", "create", "rotate", "pause", "resume", "revoke", "verify", "expiring", "audit",
           "workspaces", "review")


def test_every_command_uses_indexes(grown, tmp_path):
    dsn, workspace, email = grown
    w = ["--workspace-public-id", workspace["publicId"]]
    token_file = tmp_path / "t"
    support.run_cli(["create", *w, "--slug", "planned", "--display-name", "P", "--token-name", "t",
                     "--scopes", "boards:read", "--token-file", str(token_file), "--confirm"], dsn,
                    {"AGENT_IDENTITY_ADMIN_EMAIL": email})
    token = token_file.read_text().strip()
    commands = [
        (["inspect", *w, "--slug", "seeded-17", "--events", "20"], ""),
        (["list", *w], ""),
        (["list", *w, "--after", "I00000000011", "--status", "active"], ""),
        (["create", *w, "--slug", "planned-2", "--display-name", "P", "--token-name", "t",
          "--scopes", "boards:read", "--token-file", str(tmp_path / "t2"), "--confirm"], ""),
        (["rotate", *w, "--slug", "seeded-18", "--grace", "1h", "--token-file", str(tmp_path / "t3"),
          "--confirm"], ""),
        (["pause", *w, "--slug", "seeded-19", "--confirm"], ""),
        (["resume", *w, "--slug", "seeded-19", "--confirm"], ""),
        (["revoke", *w, "--slug", "seeded-20", "--confirm"], ""),
        (["revoke", *w, "--slug", "planned", "--token", token[10:22], "--dry-run"], ""),
        (["verify"], token),
        (["verify", *w], token),
        (["inspect", *w, "--slug", "seeded-21", "--admin-user-email", "crowd-7@example.com"], ""),
        (["expiring", "--within", "30d"], ""),
        (["expiring", "--workspace", workspace["publicId"]], ""),
        (["list", "--workspace", workspace["publicId"]], ""),
        (["audit", *w], ""),
        (["audit", *w, "--since", "24h", "--action", "identity.paused", "--after", "E00000000064"], ""),
        (["audit", *w, "--slug", "seeded-17", "--actor", "seed@example.com"], ""),
        (["audit", *w, "--token", token[10:22]], ""),
        (["audit", "--token", token[10:22], "--until", "1h"], ""),
        (["audit", "head", *w], ""),
        (["audit", "head"], ""),
        (["review"], ""),
        (["review", "--workspace", workspace["publicId"], "--include-revoked"], ""),
    ]
    assert {argv[0] for argv, _ in commands} == set(COVERED) - {"workspaces"}
    seen = 0
    for argv, stdin in commands:
        code, plans = plans_of(argv, dsn, email, stdin)
        assert code in (0, 4, 9, 11), argv
        for text, plan in plans:
            seen += 1
            sequential = {relation for node, relation in scans(plan[0]["Plan"])
                          if node == "Seq Scan" and relation in WATCHED}
            assert not sequential, f"{argv[0]}: sequential scan of {sequential} in\n{text[:400]}"
    assert seen >= 26


@pytest.mark.parametrize("args", [[], ["--since", "7d"], ["--after", "E00000000064"], ["--slug", "seeded-17"],
                                  ["--until", "2026-01-01T00:00:00Z"]])
def test_audit_reads_one_page_not_the_workspace(grown, args):
    """audit on a workspace of 100,000 events reads about one page of them, newest first
    from an index, whatever the window: what keeps it flat at 1,000,000."""
    dsn, workspace, email = grown
    code, plans = plans_of(["audit", "--workspace-public-id", workspace["publicId"], "--limit", "50", *args],
                           dsn, email, analyze=True)
    assert code == 0
    [(text, plan)] = plans

    def nodes(node):
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    events_read = [node for node in nodes(plan[0]["Plan"]) if node.get("Relation Name") == "agent_audit_event"]
    assert events_read and all(node["Node Type"] != "Seq Scan" for node in events_read), events_read
    assert sum(node["Actual Rows"] * node.get("Actual Loops", 1) for node in events_read) <= 52, \
        [(node["Node Type"], node.get("Index Name"), node["Actual Rows"]) for node in events_read]


def test_workspaces_reads_each_managed_workspace_once(grown):
    """`workspaces` counts every identity and live token of the workspaces it lists, so on a
    workspace of 2,000 identities a sequential read is the planner's right choice; what it
    must not do is read workspace_members in full, or read tokens of workspaces it skips."""
    dsn, workspace, email = grown
    code, plans = plans_of(["workspaces"], dsn, email)
    assert code == 0
    [(text, plan)] = plans
    relations = [relation for node, relation in scans(plan[0]["Plan"]) if node == "Seq Scan"]
    assert "workspace_members" not in relations, text[:400]


def test_a_bulk_action_reads_the_workspace_once_and_nothing_else_in_full(grown):
    """pause --all locks every active identity of the workspace (2,000 here), so it reads
    them all by design; it must not read workspace_members or the tokens in full."""
    dsn, workspace, email = grown
    code, plans = plans_of(["pause", "--workspace-public-id", workspace["publicId"], "--all", "--dry-run"],
                           dsn, email)
    assert code == 0
    for text, plan in plans:
        relations = {relation for node, relation in scans(plan[0]["Plan"]) if node == "Seq Scan"}
        assert not relations & {"workspace_members", "agent_token", "agent_audit_event"}, text[:400]


def test_the_chain_head_is_one_index_probe(grown):
    """The head of a 100,000-event chain — what every write's trigger reads, through the
    same function audit head calls — is one row from the unique (workspace, sequence) index."""
    dsn, workspace, email = grown
    code, plans = plans_of(["audit", "head", "--workspace-public-id", workspace["publicId"]], dsn, email,
                           analyze=True)
    assert code == 0
    [(text, plan)] = plans
    nodes, pending = [], [plan[0]["Plan"]]
    while pending:
        node = pending.pop()
        nodes.append(node)
        pending.extend(node.get("Plans", []))
    head = [node for node in nodes if node.get("Index Name") == "agent_audit_event_workspace_sequence_idx"]
    assert head and head[0]["Actual Rows"] == 1, [(n["Node Type"], n.get("Index Name")) for n in nodes]



def test_the_head_lookup_never_walks_events_outside_the_chain(grown):
    """20,000 events without a place in the chain (written before it, or past its trigger)
    must cost the head lookup nothing: they are not in the chain's index. (They once were,
    at its end, and every lookup walked them: chaining 100,000 older events on upgrade
    took longer than ten minutes instead of seven seconds.)"""
    dsn, workspace, email = grown
    with psycopg.connect(dsn) as conn:  # one transaction, rolled back
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", action)
                        SELECT 'U' || lpad(to_hex(g), 11, '0'), %s, 'identity.paused'
                        FROM generate_series(1, 20000) AS g""", (workspace["id"],))
        [[plan]] = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM agent_audit_chain_head(%s)",
                                (workspace["id"],)).fetchall()
        conn.rollback()
    top = plan[0]["Plan"]
    assert top["Actual Rows"] == 1
    assert top["Shared Hit Blocks"] + top["Shared Read Blocks"] <= 10, top


def rule_calls(plan: dict) -> list[dict]:
    """Each node of a plan that runs agent_login_workspaces, the proven login's rule."""
    found, pending = [], [plan[0]["Plan"]]
    while pending:
        node = pending.pop()
        found += [node] if any("agent_login_workspaces()" in output for output in node.get("Output", [])) else []
        pending.extend(node.get("Plans", []))
    return found


def test_a_proven_logins_rule_runs_once_per_statement_not_per_row(grown):
    """Row level security admits a maintainer's own login (docs/security.md, "Proven
    actors") by one call of its rule per statement: by hand, a count of 2,000 identities,
    and every statement of list, audit, expiring and review."""
    dsn, workspace, email = grown
    w = ["--workspace-public-id", workspace["publicId"]]
    with support.maintainer_group(dsn) as group:
        login, login_dsn = support.maintainer_login(dsn, group, email)
        try:
            with psycopg.connect(login_dsn) as conn:
                [[plan]] = conn.execute("""EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON)
                                           SELECT count(*) FROM agent_identity WHERE "workspaceId" = %s""",
                                        (workspace["id"],)).fetchall()
                assert conn.execute('SELECT count(*) FROM agent_identity WHERE "workspaceId" = %s',
                                    (workspace["id"],)).fetchone()[0] >= GROWN["identities"]
            calls = rule_calls(plan)
            assert [node["Actual Loops"] for node in calls] == [1], calls
            for argv in (["list", *w], ["audit", *w], ["expiring"], ["review"]):
                code, plans = plans_of(argv, login_dsn, email, analyze=True)
                assert code in (0, 9, 11), argv
                loops = [node["Actual Loops"] for _, plan in plans for node in rule_calls(plan)]
                assert loops and set(loops) <= {0, 1}, (argv, loops)
        finally:
            support.drop_role(dsn, login)
