"""review, the access review: every agent the actor manages, what it holds, who made it,
whether it is used, and what to act on — never-expires, unused, stale, orphaned — as a
table, JSON, JSON lines and CSV, exit 11 when anything needs acting on."""

import csv
import io
import json
import subprocess
import sys

import psycopg
import pytest

from tests import support


# Times are moved back here past the triggers (an identity made 60 days ago): a database of its own.
database, cli_dsn = support.own_database_fixtures()


def backdate(db, statement: str, params) -> None:
    support.outside_the_tool(db, statement, params)


def used_now(db, token_public_id: str) -> None:
    """What the Kan server does when an agent calls: stamp the token's use."""
    assert db.execute("SELECT agent_token_stamp(%s)", (token_public_id,)).fetchone()[0] is True


@pytest.fixture
def reviewed(db, kan, cli):
    """One workspace reviewed by `reviewer`, its identities made by `maker` (another
    admin): healthy, never-expires, unused, stale, and three whose maker is then
    removed, demoted or deleted in three workspaces of their own (one handed over);
    and a workspace the reviewer does not manage."""
    reviewer = kan.user()
    workspace = kan.workspace()
    kan.member(workspace, reviewer)
    maker = kan.user()
    kan.member(workspace, maker)
    made = support.Operator(cli, workspace, maker["email"])
    tokens = {}
    for slug, args in (("healthy", ()), ("forever", ("--expires-in", "never")), ("idle", ()), ("old-token", ())):
        tokens[slug] = made.create(slug, *args).json["token"]["publicId"]
    for slug in ("healthy", "forever", "old-token"):
        used_now(db, tokens[slug])
    backdate(db, """UPDATE agent_identity SET "createdAt" = "createdAt" - interval '60 days'
                    WHERE "workspaceId" = %s AND slug = 'idle'""", (workspace["id"],))
    backdate(db, """UPDATE agent_token SET "createdAt" = "createdAt" - interval '100 days'
                    WHERE "publicId" = %s""", (tokens["old-token"],))
    orphans = {}
    for how in ("removed", "demoted", "deleted", "handed-over"):
        place = kan.workspace()
        kan.member(place, reviewer)
        leaver = kan.user()
        membership = kan.member(place, leaver)
        token = support.Operator(cli, place, leaver["email"]).create(f"left-{how}").json["token"]["publicId"]
        used_now(db, token)
        if how == "removed":
            db.execute("UPDATE workspace_members SET status = 'removed' WHERE id = %s", (membership,))
        elif how == "demoted":
            db.execute("UPDATE workspace_members SET role = 'member' WHERE id = %s", (membership,))
        else:
            db.execute('DELETE FROM workspace_members WHERE id = %s', (membership,))
            if how == "deleted":
                db.execute('DELETE FROM "user" WHERE id = %s', (leaver["id"],))
            else:  # a maintainer who still manages it takes it over: a rotation
                rotated = support.Operator(cli, place, reviewer["email"])("rotate", "--slug", f"left-{how}",
                                                                           "--confirm")
                used_now(db, rotated.json["token"]["publicId"])
        orphans[how] = place
    elsewhere, stranger = kan.managed_workspace()
    support.Operator(cli, elsewhere, stranger["email"]).create("not-mine", "--expires-in", "never")
    return {"reviewer": reviewer, "maker": maker, "workspace": workspace, "orphans": orphans}


def review(cli, email: str, *args: str) -> support.Run:
    return cli("review", *args, env={"AGENT_IDENTITY_ADMIN_EMAIL": email})


def test_each_finding_and_its_action(cli, reviewed):
    run = review(cli, reviewed["reviewer"]["email"], "--json")
    assert run.code == 11, run.stderr
    found = {row["slug"]: row for row in run.json["identities"]}
    assert {slug: row["findings"] for slug, row in found.items()} == {
        "healthy": [], "forever": ["never-expires"], "idle": ["unused"], "old-token": ["stale"],
        "left-removed": ["orphaned"], "left-demoted": ["orphaned"], "left-deleted": ["orphaned"],
        "left-handed-over": []}
    assert "not-mine" not in found
    assert run.json["checked"] == {"workspaces": 5, "identities": 8}
    forever = found["forever"]
    assert forever["actions"] == [f"agent-identity rotate --workspace-public-id {forever['workspacePublicId']} "
                                  "--slug forever --expires-in 90d --grace 1h --token-file - "
                                  '--reason "access review: never-expires" --confirm']
    assert found["idle"]["actions"][0].startswith("agent-identity pause --workspace-public-id ")
    assert (forever["createdBy"], forever["liveTokens"], forever["nextExpiry"], forever["scopes"]) == (
        reviewed["maker"]["email"], 1, None, ["boards:read", "cards:write"])
    assert found["left-deleted"]["createdBy"] is None
    assert found["idle"]["lastUsedAt"] is None and found["healthy"]["lastUsedAt"] is not None
    workspaces = [row["workspacePublicId"] for row in run.json["identities"]]
    assert workspaces[0] == reviewed["orphans"]["handed-over"]["publicId"], "newest workspace first"
    assert [row["slug"] for row in run.json["identities"] if row["workspacePublicId"] == workspaces[-1]] == [
        "forever", "healthy", "idle", "old-token"], "then by slug"


def test_thresholds_move_the_findings(cli, reviewed):
    loose = review(cli, reviewed["reviewer"]["email"], "--workspace-public-id", reviewed["workspace"]["publicId"],
                   "--idle", "90d", "--max-age", "120d", "--json")
    assert {row["slug"]: row["findings"] for row in loose.json["identities"]} == {
        "healthy": [], "forever": ["never-expires"], "idle": [], "old-token": []}
    assert loose.json["checked"] == {"workspaces": 1, "identities": 4}


@pytest.mark.parametrize("value", ["0d", "366d", "soon"])
def test_a_threshold_that_is_no_duration_is_a_usage_error(cli, value):
    run = review(cli, "a@example.com", "--idle", value)
    assert (run.code, run.stdout) == (2, "") and "--idle" in run.stderr


def test_no_finding_is_exit_0_and_revoked_ones_are_listed_on_request(kan, cli):
    workspace, admin = kan.managed_workspace()
    operator = support.Operator(cli, workspace, admin["email"])
    operator.create("fine")
    operator.create("gone")
    operator("revoke", "--slug", "gone", "--confirm")
    run = review(cli, admin["email"], "--json")
    assert (run.code, [row["slug"] for row in run.json["identities"]]) == (0, ["fine"])
    everything = review(cli, admin["email"], "--include-revoked", "--json")
    assert {row["slug"]: (row["status"], row["findings"]) for row in everything.json["identities"]} == {
        "fine": ("active", []), "gone": ("revoked", [])}


def test_an_actor_who_manages_nothing_is_refused_and_one_workspace_is_audited(db, kan, cli, reviewed):
    stranger = review(cli, "typo@example.com")
    assert (stranger.code, stranger.stdout) == (4, "")
    assert "nothing was checked" in stranger.stderr
    outsider = kan.user()
    before = support.snapshot(db)
    refused = review(cli, outsider["email"], "--workspace-public-id", reviewed["workspace"]["publicId"])
    assert refused.code == 4
    [event] = support.added_rows(before, support.snapshot(db))["agent_audit_event"]
    assert (event["action"], event["metadata"]["command"]) == ("access.denied", "review")


def test_csv_parses_and_jsonl_is_one_identity_per_line(cli, cli_dsn, reviewed):
    email = reviewed["reviewer"]["email"]
    as_json = review(cli, email, "--json").json["identities"]
    table = review(cli, email, "--csv")
    assert table.code == 11
    rows = list(csv.DictReader(io.StringIO(table.stdout, newline="")))
    assert [(row["slug"], row["findings"]) for row in rows] == [
        (row["slug"], "; ".join(row["findings"])) for row in as_json]
    raw = subprocess.run([sys.executable, str(support.SCRIPT), "review", "--csv"], capture_output=True, timeout=60,
                         env=support.cli_env(cli_dsn, AGENT_IDENTITY_ADMIN_EMAIL=email))
    assert raw.stdout.endswith(b"\r\n") and raw.stdout.count(b"\r\n") == len(rows) + 1, "RFC 4180 line ends"
    lines = review(cli, email, "--jsonl")
    assert [json.loads(line)["slug"] for line in lines.stdout.splitlines()] == [row["slug"] for row in as_json]
    both = review(cli, email, "--csv", "--jsonl")
    assert both.code == 2


def test_a_stored_value_never_becomes_a_spreadsheet_formula(db, kan, cli):
    workspace, admin = kan.managed_workspace()
    db.execute("UPDATE workspace SET slug = %s WHERE id = %s", ("=HYPERLINK(\"http://evil\")", workspace["id"]))
    support.Operator(cli, workspace, admin["email"]).create("plain")
    rows = list(csv.reader(io.StringIO(review(cli, admin["email"], "--csv").stdout, newline="")))
    assert rows[1][1] == "'=HYPERLINK(\"http://evil\")"
    action = review(cli, admin["email"], "--json").json["identities"][0]
    assert action["findings"] == []


def test_the_table_fits_80_columns_and_names_each_finding(cli, reviewed):
    run = review(cli, reviewed["reviewer"]["email"])
    assert run.code == 11
    assert all(len(line) <= 80 for line in run.stdout.splitlines() if "agent-identity " not in line), run.stdout
    assert "forever: never-expires (holds a live token that never expires (or not within a year): rotate it into " \
           "the secret manager with an expiry): agent-identity rotate" in run.stdout


def test_the_least_privilege_role_needs_no_more_grants(database, reviewed):
    """docs/security.md's role runs review (the suite's cli_dsn is that role when AGENT_IDENTITY_TEST_AS says so;
    here it is made from the document either way)."""
    with support.least_privilege_role(database) as dsn:
        run = support.run_cli(["review", "--json"], dsn, {"AGENT_IDENTITY_ADMIN_EMAIL": reviewed["reviewer"]["email"]})
    assert run.code == 11, run.stderr
    assert len(run.json["identities"]) == 8


def test_one_rule_decides_for_the_access_check_and_review(db, kan):
    """agent_managed_workspaces is the rule every command's access check runs: each case of test_access
    (which holds the CLI to Kan's rule) is its answer too."""
    from tests.test_access import CASES

    for name, (build, code, _) in CASES.items():
        workspace, user = kan.workspace(), kan.user()
        build(kan, workspace, user)
        managed = [row[0] for row in db.execute("SELECT agent_managed_workspaces(%s)", (user["id"],))]
        assert (workspace["id"] in managed) is (code == 0), name
    assert db.execute("SELECT count(*) FROM agent_managed_workspaces(NULL)").fetchone()[0] == 0


def test_an_unused_paused_identity_is_revoked_not_paused_again(db, kan, cli):
    workspace, admin = kan.managed_workspace()
    operator = support.Operator(cli, workspace, admin["email"])
    operator.create("asleep")
    operator("pause", "--slug", "asleep", "--confirm")
    backdate(db, """UPDATE agent_identity SET "createdAt" = "createdAt" - interval '60 days'
                    WHERE "workspaceId" = %s""", (workspace["id"],))
    [row] = review(cli, admin["email"], "--json").json["identities"]
    assert row["findings"] == ["unused"]
    assert row["actions"] == [f"agent-identity revoke --workspace-public-id {workspace['publicId']} --slug asleep "
                              '--reason "access review: unused" --confirm']


@pytest.mark.parametrize("column, value", [('"createdAt"', "timezone('utc', now()) + interval '1 year'"),
                                           ('"lastUsedAt"', "timezone('utc', now()) + interval '1 year'"),
                                           ('"expiresAt"', "'9999-01-01'")])
def test_a_token_made_by_hand_cannot_dodge_the_review(database, kan, cli, column, value):
    """As docs/security.md's role: a token issued in the future, already used, or for ever but not NULL, refused."""
    workspace, admin = kan.managed_workspace()
    identity = support.Operator(cli, workspace, admin["email"]).create("dodger").json["identity"]["publicId"]
    with support.least_privilege_role(database) as dsn, psycopg.connect(dsn) as attacker, \
            pytest.raises(psycopg.errors.CheckViolation) as refused:
        attacker.execute(f"""INSERT INTO agent_token ("publicId", "agentIdentityId", name, "tokenHash", scopes, {column})
                             SELECT 'Dodge0000001', id, 'x', 'x', '{{boards:read}}', {value}
                             FROM agent_identity WHERE "publicId" = %s""", (identity,))
    assert "a token is issued now, unused and live, for at most 365 days" in refused.value.diag.message_primary


def test_a_control_character_stored_in_a_name_reaches_no_csv_cell(db, kan, cli):
    workspace, admin = kan.managed_workspace()
    db.execute("UPDATE workspace SET slug = %s WHERE id = %s", ("bad\x1b[31mred", workspace["id"]))
    support.Operator(cli, workspace, admin["email"]).create("plain")
    table = review(cli, admin["email"], "--csv").stdout
    assert "\x1b" not in table and "bad\\x1b[31mred" in table
