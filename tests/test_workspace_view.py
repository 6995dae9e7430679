"""The operator's view across a workspace and across workspaces: --workspace by slug,
`workspaces`, `expiring`, and list's warnings for the whole workspace."""

import psycopg
import pytest

from tests import support


def add_workspace(db, public_id: str, slug: str) -> dict:
    workspace_id = db.execute('INSERT INTO workspace ("publicId", name, slug) VALUES (%s, %s, %s) RETURNING id',
                              (public_id, f"Workspace {slug}", slug)).fetchone()[0]
    return {"id": workspace_id, "publicId": public_id, "slug": slug}


def unique(prefix: str) -> str:
    import secrets

    return f"{prefix}-{secrets.token_hex(3)}"


def test_every_command_takes_the_workspace_by_slug(db, kan, cli):
    admin = kan.user()
    slug = unique("acme-eng")
    workspace = add_workspace(db, support.tool.new_public_id(), slug)
    kan.member(workspace, admin)
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}
    created = cli("create", "--workspace", slug, "--slug", "by-slug", "--display-name", "S", "--token-name", "t",
                  "--scopes", "boards:read", "--confirm", "--json", env=env)
    assert created.code == 0, created.stdout
    assert created.json["identity"]["workspacePublicId"] == workspace["publicId"]
    for command in (["inspect", "--slug", "by-slug"], ["list"], ["pause", "--slug", "by-slug", "--confirm"],
                    ["expiring"]):
        result = cli(command[0], "--workspace", slug, *command[1:], "--json", env=env)
        assert result.code == 0, (command, result.stdout)
    # doctor judges the whole database, which other tests share (and some tamper with on
    # purpose): what this test owns is the actor's check, found by slug.
    doctor = cli("doctor", "--workspace", slug, "--json", env=env)
    [actor] = [check for check in doctor.json["checks"] if check["name"] == "actor"]
    assert actor["ok"] and actor["detail"] == f"{admin['email']} manages workspace {slug}", doctor.stdout


def test_a_public_id_wins_over_a_slug_that_reads_the_same(db, kan, cli):
    admin = kan.user()
    name = support.tool.new_public_id().lower()[:11] + "1"
    by_id = add_workspace(db, name, unique("first"))
    by_slug = add_workspace(db, support.tool.new_public_id(), name)
    for workspace in (by_id, by_slug):
        kan.member(workspace, admin)
    listed = cli("list", "--workspace", name, "--json", env={"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})
    assert listed.json["workspacePublicId"] == by_id["publicId"]


def test_an_unknown_workspace_suggests_the_closest_one_the_actor_manages(db, kan, cli):
    admin, stranger = kan.user(), kan.user()
    mine = add_workspace(db, support.tool.new_public_id(), unique("payments"))
    kan.member(mine, admin)
    theirs = add_workspace(db, support.tool.new_public_id(), unique("payroll"))
    kan.member(theirs, stranger)
    typo = mine["slug"][:-1]
    result = cli("list", "--workspace", typo, env={"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})
    assert result.code == 3
    assert result.stderr == (f'agent-identity: error: workspace "{typo}" not found (did you mean {mine["slug"]}?)\n')
    # A stranger is never shown the names of workspaces they do not manage.
    other = cli("list", "--workspace", typo, env={"AGENT_IDENTITY_ADMIN_EMAIL": stranger["email"]})
    assert other.code == 3 and mine["slug"] not in other.stderr


def test_a_refusal_by_slug_is_audited_and_reveals_nothing(db, kan, cli):
    owner, outsider = kan.user(), kan.user()
    workspace = add_workspace(db, support.tool.new_public_id(), unique("secret-team"))
    kan.member(workspace, owner)
    before = support.snapshot(db)
    result = cli("list", "--workspace", workspace["slug"], env={"AGENT_IDENTITY_ADMIN_EMAIL": outsider["email"]})
    assert result.code == 4 and result.stdout == ""
    [event] = support.added_rows(before, support.snapshot(db))["agent_audit_event"]
    assert (event["action"], event["workspaceId"]) == ("access.denied", workspace["id"])


def test_workspaces_lists_what_the_actor_may_manage(db, kan, cli):
    admin = kan.user()
    managed = [add_workspace(db, support.tool.new_public_id(), unique(f"team-{n}")) for n in (1, 2)]
    for workspace in managed:
        kan.member(workspace, admin)
    member_only = add_workspace(db, support.tool.new_public_id(), unique("team-3"))
    kan.member(member_only, admin, role="member")
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}
    operator = support.Operator(cli, managed[0], admin["email"])
    operator.create("one")
    operator.create("two")
    operator("pause", "--slug", "two", "--confirm")
    result = cli("workspaces", "--json", env=env)
    assert result.code == 0, result.stdout
    listed = {w["slug"]: w for w in result.json["workspaces"]}
    assert set(listed) == {w["slug"] for w in managed}
    assert listed[managed[0]["slug"]]["identities"] == {"active": 1, "paused": 1, "revoked": 0}
    assert listed[managed[0]["slug"]]["liveTokens"] == 2 and listed[managed[1]["slug"]]["liveTokens"] == 0
    human = cli("workspaces", env=env)
    assert human.stdout.splitlines()[0].split()[:3] == ["PUBLIC", "ID", "SLUG"]
    nobody = cli("workspaces", env={"AGENT_IDENTITY_ADMIN_EMAIL": "nobody@example.com"})
    assert (nobody.code, nobody.stdout) == (0, 'no workspace that "nobody@example.com" may manage\n')


def test_expiring_finds_tokens_across_managed_workspaces_and_exits_9(db, kan, cli):
    admin, stranger = kan.user(), kan.user()
    first, second = (add_workspace(db, support.tool.new_public_id(), unique(f"ops-{n}")) for n in (1, 2))
    for workspace in (first, second):
        kan.member(workspace, admin)
    elsewhere = add_workspace(db, support.tool.new_public_id(), unique("elsewhere"))
    kan.member(elsewhere, stranger)
    soon = support.Operator(cli, first, admin["email"]).create("soon", "--expires-in", "3d").json["token"]
    support.Operator(cli, second, admin["email"]).create("later", "--expires-in", "30d")
    support.Operator(cli, elsewhere, stranger["email"]).create("hidden", "--expires-in", "1d")
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}

    week = cli("expiring", "--json", env=env)
    assert week.code == 9 and week.json["ok"] is False
    assert [(t["slug"], t["publicId"]) for t in week.json["tokens"]] == [("soon", soon["publicId"])]
    month = cli("expiring", "--within", "60d", "--json", env=env)
    assert [t["slug"] for t in month.json["tokens"]] == ["soon", "later"]
    quiet = cli("expiring", "--workspace", second["slug"], env=env)
    assert (quiet.code, quiet.stdout) == (0, "no live token expires within 7d\n")
    human = cli("expiring", env=env)
    assert "soon" in human.stdout and "hidden" not in human.stdout and human.code == 9

    before = support.snapshot(db)
    refused = cli("expiring", "--workspace", elsewhere["slug"], env=env)
    assert refused.code == 4 and "hidden" not in refused.stdout + refused.stderr
    assert [e["action"] for e in support.added_rows(before, support.snapshot(db))["agent_audit_event"]] == \
        ["access.denied"]


def test_list_warns_about_the_whole_workspace_not_only_the_page(operator):
    operator.create("expires-soon", "--expires-in", "2d")
    operator.create("newest")
    page = operator("list", "--limit", "1")
    assert [i["slug"] for i in page.json["identities"]] == ["newest"]
    assert any("agent identity expires-soon has a live token that expires in 2 days" in line
               for line in page.stderr.splitlines())


# --- a token's public id is enough -------------------------------------------------


def test_inspect_and_revoke_by_token_id_alone(db, operator):
    created = operator.create("found").json["token"]
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": operator.email}
    for form in (created["publicId"], f"kan_agent_{created['publicId']}"):
        inspected = operator.cli("inspect", "--token", form, "--json", env=env)
        assert inspected.code == 0, inspected.stdout
        assert inspected.json["identity"]["slug"] == "found"
        assert inspected.json["identity"]["workspacePublicId"] == operator.workspace["publicId"]
        assert "rotate it" not in inspected.stderr, "an id is not a leaked token"
    revoked = operator.cli("revoke", "--token", f"kan_agent_{created['publicId']}", "--reason", "scanner hit",
                           "--confirm", "--json", env=env)
    assert revoked.code == 0, revoked.stdout
    assert revoked.json["revokedTokenPublicIds"] == [created["publicId"]]
    assert db.execute('SELECT "revokedAt" IS NOT NULL FROM agent_token WHERE "publicId" = %s',
                      (created["publicId"],)).fetchone()[0]


@pytest.mark.skipif(support.PROVEN, reason=support.NAMES_WHAT_IT_AIMED_AT)
def test_a_token_id_tells_an_outsider_nothing(db, kan, cli, operator):
    token = operator.create("kept-quiet").json["token"]["publicId"]
    outsider = kan.managed_workspace()[1]["email"]
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": outsider}
    before = support.snapshot(db)
    real = cli("inspect", "--token", token, env=env)
    unknown = cli("inspect", "--token", "Zz99Zz99Zz99", env=env)
    assert real.code == unknown.code == 3
    assert real.stderr.replace(token, "ID") == unknown.stderr.replace("Zz99Zz99Zz99", "ID")
    assert real.stderr == f"agent-identity: error: no token {token} in a workspace you manage\n"
    [event] = support.added_rows(before, support.snapshot(db))["agent_audit_event"]
    assert (event["action"], event["workspaceId"], event["metadata"]["tokenPublicId"]) == \
        ("access.denied", operator.workspace["id"], token)


def test_a_whole_token_given_as_an_id_is_refused_and_blanked(operator):
    secret = operator.create("whole").json["token"]["secret"]
    result = operator.cli("inspect", "--token", secret, env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert result.code == 2
    assert secret.rsplit("_", 1)[1] not in result.stderr and "rotate it" in result.stderr


def test_inspect_needs_a_slug_and_workspace_or_a_token(operator):
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": operator.email}
    result = operator.cli("inspect", "--workspace-public-id", operator.workspace["publicId"], env=env)
    assert result.code == 2 and "--slug" in result.stderr and "(or --token)" in result.stderr


# --- bulk incident actions: pause, resume, revoke --all --------------------------


def test_pause_all_moves_every_active_identity_in_one_batch(db, operator):
    for slug in ("bulk-a", "bulk-b", "bulk-c"):
        operator.create(slug)
    operator("pause", "--slug", "bulk-c", "--confirm")
    before = support.snapshot(db)
    planned = operator("pause", "--all", "--dry-run", json=False)
    assert planned.code == 0 and planned.stdout.startswith(
        f"would pause 2 agent identities in workspace {operator.workspace['publicId']}: bulk-a, bulk-b")
    assert support.snapshot(db) == before
    done = operator("pause", "--all", "--reason", "incident 42", "--confirm")
    assert done.code == 0, done.stdout
    assert [i["slug"] for i in done.json["identities"]] == ["bulk-a", "bulk-b"]
    from psycopg.rows import dict_row

    events = db.cursor(row_factory=dict_row).execute(
        "SELECT action, metadata, reason FROM agent_audit_event WHERE metadata->>'batchId' = %s ORDER BY id",
        (done.json["batchId"],)).fetchall()
    assert [e["action"] for e in events] == ["identity.paused"] * 2
    assert {e["metadata"]["batchId"] for e in events} == {done.json["batchId"]}
    assert {e["metadata"]["batchCount"] for e in events} == {2} and {e["reason"] for e in events} == {"incident 42"}
    statuses = dict(db.execute('SELECT slug, status::text FROM agent_identity WHERE "workspaceId" = %s',
                               (operator.workspace["id"],)).fetchall())
    assert statuses == {"bulk-a": "paused", "bulk-b": "paused", "bulk-c": "paused"}
    again = operator("pause", "--all", "--confirm")
    assert (again.code, again.json["changed"]) == (0, False)


def test_revoke_all_revokes_every_token_too(db, operator):
    tokens = [operator.create(slug).json["token"]["publicId"] for slug in ("gone-a", "gone-b")]
    done = operator("revoke", "--all", "--confirm")
    assert sorted(done.json["revokedTokenPublicIds"]) == sorted(tokens)
    live = db.execute("""SELECT count(*) FROM agent_token t JOIN agent_identity i ON i.id = t."agentIdentityId"
                         WHERE i."workspaceId" = %s AND t."revokedAt" IS NULL""",
                      (operator.workspace["id"],)).fetchone()[0]
    assert live == 0


def test_a_held_lock_on_one_identity_stops_the_whole_batch(db, database, operator):

    for slug in ("batch-a", "batch-b"):
        operator.create(slug)
    before = support.snapshot(db)
    lock = support.HeldLock(database, operator.workspace["id"], "batch-b")
    try:
        result = operator("pause", "--all", "--lock-timeout", "1", "--confirm")
    finally:
        lock.release()
    assert result.code == 5
    assert support.snapshot(db) == before, "nothing written"


def test_a_batch_locks_its_identities_in_ascending_id_order(db, database, cli_dsn, operator):
    """Two batches (or a batch and anything else) take their locks in the same order, so
    they cannot wait on each other in a circle: with the middle identity held, a batch
    waiting for it holds the first (locked FOR UPDATE, as read) and not yet the last."""
    for slug in ("order-a", "order-b", "order-c"):
        operator.create(slug)
    lock = support.HeldLock(database, operator.workspace["id"], "order-b")
    try:
        process = support.start_cli(["pause", "--workspace-public-id", operator.workspace["publicId"], "--all",
                                     "--lock-timeout", "30", "--confirm"], cli_dsn,
                                    {"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
        support.waiting_backend(db)
        with psycopg.connect(database) as probe:
            def free(slug: str) -> bool:
                try:
                    probe.execute("""SELECT id FROM agent_identity WHERE "workspaceId" = %s AND slug = %s
                                     FOR UPDATE NOWAIT""", (operator.workspace["id"], slug))
                    return True
                except psycopg.errors.LockNotAvailable:
                    return False
                finally:
                    probe.rollback()

            assert (free("order-a"), free("order-c")) == (False, True)
    finally:
        lock.release()
    assert process.wait(timeout=60) == 0, process.stderr.read()
    statuses = db.execute("""SELECT status::text FROM agent_identity WHERE "workspaceId" = %s AND slug LIKE 'order-%%'""",
                          (operator.workspace["id"],)).fetchall()
    assert statuses == [("paused",)] * 3


def test_bulk_refusal_is_audited(db, kan, cli, operator):
    operator.create("guarded")
    outsider = kan.user()
    before = support.snapshot(db)
    result = cli("pause", "--workspace-public-id", operator.workspace["publicId"], "--all", "--confirm",
                 env={"AGENT_IDENTITY_ADMIN_EMAIL": outsider["email"]})
    assert result.code == 4
    added = support.added_rows(before, support.snapshot(db))
    assert [e["action"] for e in added["agent_audit_event"]] == ["access.denied"] and "agent_identity" not in added


def test_all_and_slug_are_one_or_the_other(operator):
    result = operator("pause", "--all", "--slug", "x", "--confirm")
    assert result.code == 2 and "not both" in result.json["error"]["message"]
    missing = operator("pause", "--confirm")
    assert missing.code == 2 and "--slug or --all" in missing.json["error"]["message"]
