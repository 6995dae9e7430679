"""Proven actors (docs/security.md): maintainers with logins of their own, made by the
document's two blocks as written, side by side with the shared least-privilege role.
Each refusal is tried through the CLI and by hand, psycopg connected as the login.

Alice manages workspace A, Bob workspace B; Carol is a member of A without
workspace:manage; Dave's login is in the group but nobody mapped it.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import psycopg
import pytest

import agent_identity_admin as tool
from tests import support

# By-hand attacks change rows outside the tool (the owner's tampering): a database of this module's own.
database, cli_dsn = support.own_database_fixtures()


@pytest.fixture(scope="module")
def team(database):
    conn = psycopg.connect(database, autocommit=True)
    kan = support.Kan(conn)
    a, alice = kan.managed_workspace()
    b, bob = kan.managed_workspace()
    carol = kan.user()
    kan.member(a, carol, role="member")
    dave = kan.user()
    kan.member(a, dave)  # an admin of A in Kan: only his login's mapping is missing
    with support.least_privilege_role(database) as shared, support.maintainer_group(database) as group:
        logins = {name: support.maintainer_login(database, group, user["email"])
                  for name, user in (("alice", alice), ("bob", bob), ("carol", carol))}
        dave_login = f"unmapped_{tool.new_public_id().lower()}"
        dave_dsn = psycopg.conninfo.make_conninfo(database, user=dave_login, password="x")
        conn.execute(f'CREATE ROLE "{dave_login}" LOGIN PASSWORD \'x\' IN ROLE "{group}"')
        team = SimpleNamespace(
            database=database, conn=conn, kan=kan, a=a, b=b, alice=alice, bob=bob, carol=carol, dave=dave, group=group, shared=shared,
            login={name: login for name, (login, _) in logins.items()} | {"dave": dave_login},
            dsn={name: dsn for name, (_, dsn) in logins.items()} | {"dave": dave_dsn})
        try:
            for name, workspace in (("alice", a), ("bob", b)):
                created = cli(team, name, "create", *ws(workspace), "--slug", "bot", "--display-name", "Bot",
                              "--token-name", "t", "--scopes", "boards:read", "--confirm")
                assert created.code == 0, created.stderr
            yield team
        finally:
            for login in team.login.values():
                support.drop_role(database, login)
            conn.close()


def ws(workspace: dict) -> list[str]:
    return ["--workspace-public-id", workspace["publicId"]]


def cli(team, who: str, *args: str, claim: str | None = None, env: dict | None = None) -> support.Run:
    """The CLI connected as who's own login (naming no actor unless claim)."""
    return support.run_cli([*args, *(["--admin-user-email", claim] if claim else [])], team.dsn[who], env)


@contextlib.contextmanager
def by_hand(team, who: str):
    with psycopg.connect(team.dsn[who], autocommit=True) as conn:
        yield conn


def events(team, workspace: dict) -> list[tuple]:
    return team.conn.execute(
        """SELECT action, "actorEmail", "actorUserId", login, metadata->>'condition', metadata->>'claimedEmail'
           FROM agent_audit_event WHERE "workspaceId" = %s ORDER BY "id" """, (workspace["id"],)).fetchall()


# --- who the tool says is acting ------------------------------------------------------


def test_a_proven_login_needs_no_claim_and_the_database_writes_who(team):
    made = cli(team, "alice", "create", *ws(team.a), "--slug", "made", "--display-name", "M", "--token-name", "t",
               "--scopes", "boards:read", "--confirm", "--json")
    assert made.code == 0, made.stderr
    identity = team.conn.execute("""SELECT i."createdBy", t."createdBy", t."workspaceId" FROM agent_identity i
                                    JOIN agent_token t ON t."agentIdentityId" = i."id" WHERE i."publicId" = %s""",
                                 (made.json["identity"]["publicId"],)).fetchone()
    assert identity == (team.alice["id"], team.alice["id"], team.a["id"])
    assert events(team, team.a)[-1] == ("identity.created", team.alice["email"], team.alice["id"],
                                        team.login["alice"], None, None)
    # The claim may name oneself (in any case), as the variable or the option.
    assert cli(team, "alice", "list", *ws(team.a), claim=team.alice["email"].upper()).code == 0
    assert cli(team, "alice", "list", *ws(team.a), env={"AGENT_IDENTITY_ADMIN_EMAIL": team.alice["email"]}).code == 0
    exported = cli(team, "alice", "audit", *ws(team.a), "--jsonl", "--all")
    assert exported.code == 0 and '"login": "' + team.login["alice"] + '"' in exported.stdout


@pytest.mark.parametrize("how", ["option", "variable"])
def test_a_claim_naming_anyone_else_is_refused_and_audited_as_the_login(team, how):
    before = len(events(team, team.b))
    claim = {"claim": team.bob["email"]} if how == "option" else {"env": {"AGENT_IDENTITY_ADMIN_EMAIL": team.bob["email"]}}
    refused = cli(team, "alice", "pause", *ws(team.b), "--slug", "bot", "--confirm", **claim)
    assert refused.code == 4
    assert refused.stderr == (f'agent-identity: error: login "{team.login["alice"]}" is "{team.alice["email"]}", '
                              f'not "{team.bob["email"]}": a proven login acts as its own Kan user only\n')
    after = events(team, team.b)
    assert after[before:] == [("access.denied", team.alice["email"], team.alice["id"], team.login["alice"],
                               "claim_is_not_the_login", team.bob["email"])]
    assert team.conn.execute("SELECT status::text FROM agent_identity WHERE \"workspaceId\" = %s AND slug = 'bot'",
                             (team.b["id"],)).fetchone() == ("active",)


def test_a_claim_with_no_workspace_is_audited_where_the_claimed_user_manages(team):
    before = len(events(team, team.b))
    refused = cli(team, "alice", "expiring", claim=team.bob["email"])
    assert refused.code == 4 and "not \"" + team.bob["email"] in refused.stderr
    assert [e[4] for e in events(team, team.b)[before:]] == ["claim_is_not_the_login"]


def test_a_foreign_workspace_is_refused_and_the_refusal_audited(team):
    before_a, before_b = len(events(team, team.a)), len(events(team, team.b))
    refused = cli(team, "alice", "revoke", *ws(team.b), "--slug", "bot", "--confirm")
    assert refused.code == 4 and "is not an active member of workspace" in refused.stderr
    assert events(team, team.b)[before_b:] == [("access.denied", team.alice["email"], team.alice["id"],
                                                team.login["alice"], "not_an_active_member", None)]
    assert len(events(team, team.a)) == before_a
    member = cli(team, "carol", "list", *ws(team.a))
    assert member.code == 4 and "lacks the workspace:manage permission" in member.stderr


def test_a_login_nobody_mapped_is_refused_with_the_fix_and_nothing_written(team):
    before = support.snapshot(team.conn)
    refused = cli(team, "dave", "list", *ws(team.a), claim=team.dave["email"])
    assert refused.code == 4
    assert refused.stderr == (f'agent-identity: error: login "{team.login["dave"]}" is in the maintainers\' group but '
                              "mapped to no Kan user (never mapped, or Kan deleted its user): the tables' owner maps "
                              "it with docs/security.md's maintainer-login SQL; nothing was done\n")
    doctor = cli(team, "dave", "doctor", "--json")
    assert doctor.code == 6 and doctor.json["actorProven"] is False
    [check] = [c for c in doctor.json["checks"] if c["name"] == "login"]
    assert not check["ok"] and "maintainer-login SQL" in check["fix"]
    assert support.snapshot(team.conn) == before


def test_doctor_says_which(team):
    proven = cli(team, "alice", "doctor", "--json", *ws(team.a))
    assert proven.code == 0, proven.stdout
    assert proven.json["actorProven"] is True and proven.json["login"] == team.login["alice"]
    assert proven.json["user"] == {"id": str(team.alice["id"]), "email": team.alice["email"]}
    assert [c["name"] for c in proven.json["checks"] if not c["ok"] or c["warning"]] == []
    # Only the chains it may see whole: its own workspace's (of B it sees its refusals only).
    assert {c["workspacePublicId"] for c in proven.json["chains"]} == {team.a["publicId"]}
    shared = support.run_cli(["doctor", *ws(team.a)], team.shared, {"AGENT_IDENTITY_ADMIN_EMAIL": team.alice["email"]})
    assert shared.code == 0
    assert any(line.startswith("! login: a claim: login ") for line in shared.stdout.splitlines())
    assert '  fix: give each maintainer a login of their own: docs/security.md, "Proven actors"' in shared.stdout


def test_the_shared_role_keeps_working_with_a_claim_and_must_make_one(team):
    assert support.run_cli(["list", *ws(team.b)], team.shared, {"AGENT_IDENTITY_ADMIN_EMAIL": team.bob["email"]}).code == 0
    # So does the tables' owner (a superuser here, a member of every role): it is in no group.
    owner = support.run_cli(["doctor", "--json", *ws(team.b)], team.database,
                            {"AGENT_IDENTITY_ADMIN_EMAIL": team.bob["email"]})
    assert owner.code == 0 and owner.json["actorProven"] is False, owner.stdout
    missing = support.run_cli(["list", *ws(team.b)], team.shared)
    assert missing.code == 2
    assert missing.stderr == ("agent-identity: error: say who you are: --admin-user-email or "
                              'AGENT_IDENTITY_ADMIN_EMAIL, or connect as a login of your own (docs/security.md, '
                              '"Proven actors")\n')


# --- what the database itself holds a login to -----------------------------------------


def test_by_hand_a_login_reads_only_what_it_may_manage(team):
    with by_hand(team, "alice") as conn:
        for table in ("agent_identity", "agent_token"):
            seen = {row[0] for row in conn.execute(f'SELECT DISTINCT "workspaceId" FROM {table}')}
            assert seen == {team.a["id"]}, table
        audited = conn.execute("""SELECT DISTINCT "workspaceId", action = 'access.denied' AND login = session_user
                                  FROM agent_audit_event""").fetchall()
        assert {w for w, own_refusal in audited if not own_refusal} == {team.a["id"]}
    with by_hand(team, "carol") as conn:
        assert conn.execute("SELECT count(*) FROM agent_identity").fetchone() == (0,)
    with by_hand(team, "dave") as conn:
        assert conn.execute("SELECT count(*) FROM agent_audit_event").fetchone() == (0,)


def test_by_hand_a_login_cannot_write_or_stamp_another_workspace(team):
    before = support.snapshot(team.conn)
    with by_hand(team, "alice") as conn:
        assert conn.execute("""UPDATE agent_identity SET status = 'paused', "pausedAt" = timezone('utc', now())
                               WHERE "workspaceId" = %s""", (team.b["id"],)).rowcount == 0
        assert conn.execute("""UPDATE agent_token SET "revokedAt" = timezone('utc', now())
                               WHERE "workspaceId" = %s""", (team.b["id"],)).rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("""INSERT INTO agent_identity ("publicId", "workspaceId", slug, "displayName")
                            VALUES ('Planted00000', %s, 'planted', 'P')""", (team.b["id"],))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", action)
                            VALUES ('Forged000000', %s, 'identity.paused')""", (team.b["id"],))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="agent_token_stamp"):
            conn.execute("SELECT agent_token_stamp(%s)", ("x",))
        # No turn of B, and nothing learned of its chain.
        assert conn.execute("SELECT agent_lock_workspace(%s)", (team.b["id"],)).fetchone() == (None,)
    assert support.snapshot(team.conn) == before


def test_by_hand_a_forged_actor_is_written_as_the_login(team):
    with by_hand(team, "alice") as conn, conn.transaction():
        conn.execute("""WITH made AS (
                            INSERT INTO agent_identity ("publicId", "workspaceId", slug, "displayName", "createdBy")
                            VALUES ('ByHand000001', %(a)s, 'by-hand', 'H', %(bob)s) RETURNING "id")
                        INSERT INTO agent_audit_event ("publicId", "workspaceId", "agentIdentityId", action,
                                                       "actorUserId", "actorEmail")
                        SELECT 'ByHandEvent1', %(a)s, "id", 'identity.created', %(bob)s, %(bob_email)s FROM made""",
                     {"a": team.a["id"], "bob": team.bob["id"], "bob_email": team.bob["email"]})
    assert team.conn.execute("""SELECT "createdBy" FROM agent_identity WHERE "publicId" = 'ByHand000001'""").fetchone() \
        == (team.alice["id"],)
    assert team.conn.execute("""SELECT "actorUserId", "actorEmail", login FROM agent_audit_event
                                WHERE "publicId" = 'ByHandEvent1'""").fetchone() \
        == (team.alice["id"], team.alice["email"], team.login["alice"])
    assert cli(team, "alice", "audit", "verify", *ws(team.a)).code == 0


@pytest.mark.parametrize("who", ["alice", "dave"])
def test_by_hand_a_refusal_in_another_workspace_names_nothing_there(team, who):
    """It may write (and read back) its own access.denied in B: naming B's identity in it
    would have the chain's trigger copy that identity's slug and public id for it to read.
    Nor can it name another actor: a login nobody mapped is written as nobody."""
    bot, token = team.conn.execute("""SELECT i."id", t."id" FROM agent_identity i JOIN agent_token t
                                      ON t."agentIdentityId" = i."id" WHERE i."workspaceId" = %s AND i.slug = 'bot'""",
                                   (team.b["id"],)).fetchone()
    probe = f"Probe{who:0>7}"[:12]
    with by_hand(team, who) as conn:
        conn.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", "agentIdentityId", "agentTokenId",
                                                       action, "actorUserId", "actorEmail")
                        VALUES (%s, %s, %s, %s, 'access.denied', %s, %s)""",
                     (probe, team.b["id"], bot, token, team.bob["id"], team.bob["email"]))
        seen = conn.execute("""SELECT "agentIdentityId", "identityPublicId", "identitySlug", "tokenPublicId",
                                      "actorEmail", login
                               FROM agent_audit_event WHERE "publicId" = %s""", (probe,)).fetchone()
        assert conn.execute("SELECT agent_lock_workspace(%s)", (team.b["id"],)).fetchone() == (None,)
    assert seen == (None, None, None, None, team.alice["email"] if who == "alice" else None, team.login[who])


@pytest.mark.parametrize("statement, error", [
    ('DELETE FROM agent_identity', psycopg.errors.InsufficientPrivilege),
    ("UPDATE agent_audit_event SET reason = 'x'", psycopg.errors.InsufficientPrivilege),
    ('UPDATE agent_identity SET slug = \'renamed\'', psycopg.errors.InsufficientPrivilege),
    ("""UPDATE agent_token SET "revokedAt" = NULL WHERE "revokedAt" IS NOT NULL""", psycopg.errors.CheckViolation),
    ("SELECT * FROM agent_maintainer_login", psycopg.errors.InsufficientPrivilege),
    ("""INSERT INTO agent_maintainer_login (login, "userId") VALUES (session_user, gen_random_uuid())""",
     psycopg.errors.InsufficientPrivilege),
])
def test_by_hand_a_login_can_do_no_more_than_the_shared_role(team, statement, error):
    with by_hand(team, "alice") as conn:
        rotated = cli(team, "alice", "rotate", *ws(team.a), "--slug", "bot", "--confirm")
        assert rotated.code == 0, rotated.stderr  # (a revoked token to try to revive)
        with pytest.raises(error):
            conn.execute(statement)


def test_set_role_cannot_leave_the_group_and_changes_nothing_inside_it(team):
    owner = team.conn.execute("SELECT current_user").fetchone()[0]
    with by_hand(team, "alice") as conn:
        for role in (psycopg.conninfo.conninfo_to_dict(team.shared)["user"], owner):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied to set role"):
                conn.execute(f'SET ROLE "{role}"')
        conn.execute(f'SET ROLE "{team.group}"')
        assert {row[0] for row in conn.execute('SELECT DISTINCT "workspaceId" FROM agent_identity')} == {team.a["id"]}
        assert conn.execute("SELECT login, \"userId\" FROM agent_session_login()").fetchone() \
            == (team.login["alice"], team.alice["id"])


def test_a_membership_removed_or_demoted_takes_effect_at_the_next_statement(team):
    kan = team.kan
    gone = kan.user()
    member_id = kan.member(team.b, gone)
    login, dsn = support.maintainer_login(team.database, team.group, gone["email"])
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute('SELECT count(*) FROM agent_identity').fetchone()[0] >= 1
            team.conn.execute("UPDATE workspace_members SET role = 'member' WHERE \"id\" = %s", (member_id,))
            assert conn.execute('SELECT count(*) FROM agent_identity').fetchone() == (0,)
            team.conn.execute("UPDATE workspace_members SET role = 'admin' WHERE \"id\" = %s", (member_id,))
            assert conn.execute('SELECT count(*) FROM agent_identity').fetchone()[0] >= 1
            team.conn.execute("UPDATE workspace_members SET status = 'removed' WHERE \"id\" = %s", (member_id,))
            assert conn.execute('SELECT count(*) FROM agent_identity').fetchone() == (0,)
        refused = support.run_cli(["list", *ws(team.b)], dsn)
        assert refused.code == 4 and "is not an active member" in refused.stderr
        # And the mapping dropped (as a maintainer leaves): refused at once, with the fix.
        team.conn.execute("UPDATE workspace_members SET status = 'active' WHERE \"id\" = %s", (member_id,))
        assert support.run_cli(["list", *ws(team.b)], dsn).code == 0
        team.conn.execute("DELETE FROM agent_maintainer_login WHERE login = %s", (login,))
        assert support.run_cli(["list", *ws(team.b)], dsn).code == 4
    finally:
        support.drop_role(team.database, login)


def test_a_tampered_login_is_a_break_audit_verify_reports(team, tmp_path):
    workspace, admin = team.kan.managed_workspace()
    login, dsn = support.maintainer_login(team.database, team.group, admin["email"])
    try:
        made = support.run_cli(["create", *ws(workspace), "--slug", "t", "--display-name", "T", "--token-name", "t",
                                "--scopes", "boards:read", "--confirm"], dsn)
        assert made.code == 0, made.stderr
        exported = support.run_cli(["audit", *ws(workspace), "--jsonl", "--all"], dsn)
        support.outside_the_tool(team.conn, """UPDATE agent_audit_event SET login = %s WHERE "workspaceId" = %s""",
                                 (team.login["bob"], workspace["id"]))
        verified = support.run_cli(["audit", "verify", *ws(workspace), "--json"], dsn)
        assert verified.code == 10 and verified.json["workspaces"][0]["break"]["kind"] == "changed"
        # And in an export: the login is in what the hash covers.
        tampered = exported.stdout.replace(f'"login": "{login}"', f'"login": "{team.login["bob"]}"')
        assert tampered != exported.stdout
        (tmp_path / "good.jsonl").write_text(exported.stdout)
        (tmp_path / "bad.jsonl").write_text(tampered)
        good = support.run_cli(["audit", "verify", "--file", str(tmp_path / "good.jsonl")], None)
        bad = support.run_cli(["audit", "verify", "--file", str(tmp_path / "bad.jsonl")], None)
        assert good.code == 0, good.stdout + good.stderr
        assert bad.code == 10
    finally:
        support.drop_role(team.database, login)


def test_two_maintainers_through_pgbouncer_each_see_their_own(team, database):
    users = {team.login[name]: psycopg.conninfo.conninfo_to_dict(team.dsn[name]).get("password", "")
             for name in ("alice", "bob")}
    with support.pgbouncer(database, "transaction", users=users) as pooled:
        seen = {}
        for name in ("alice", "bob", "alice"):
            dsn = psycopg.conninfo.make_conninfo(pooled, user=team.login[name],
                                                 password=users[team.login[name]])
            listed = support.run_cli(["list", "--json", *ws(team.a if name == "alice" else team.b)], dsn)
            assert listed.code == 0, listed.stderr
            foreign = support.run_cli(["inspect", *ws(team.b if name == "alice" else team.a), "--slug", "bot"], dsn)
            assert foreign.code == 4
            doctor = support.run_cli(["doctor", "--json"], dsn)
            seen[name] = (doctor.json["login"], doctor.json["user"]["email"])
        assert seen == {"alice": (team.login["alice"], team.alice["email"]),
                        "bob": (team.login["bob"], team.bob["email"])}


def test_doctor_fails_a_mapped_login_that_row_level_security_does_not_hold(team):
    """Made a member of the shared role too, a mapped login would read every workspace
    (permissive policies add up): doctor names the policy that lets it."""
    workspace, admin = team.kan.managed_workspace()
    login, dsn = support.maintainer_login(team.database, team.group, admin["email"])
    shared_role = psycopg.conninfo.conninfo_to_dict(team.shared)["user"]
    try:
        assert support.run_cli(["doctor", "--json"], dsn).code == 0
        team.conn.execute(f'GRANT "{shared_role}" TO "{login}"')
        doctor = support.run_cli(["doctor", "--json"], dsn)
        assert doctor.code == 6
        [check] = [c for c in doctor.json["checks"] if c["name"] == "login"]
        assert not check["ok"] and f"admits {shared_role} to every row" in check["detail"]
        assert "maintainers' group alone" in check["fix"]
    finally:
        support.drop_role(team.database, login)


def test_a_login_taken_away_and_the_hash_recomputed_is_still_a_break(team):
    """The owner, triggers off, makes the head a v1 event again (no login, its hash
    recomputed by the schema's own function): no event after it to disagree, yet a v1
    event after a v2 one is a break."""
    workspace, admin = team.kan.managed_workspace()
    login, dsn = support.maintainer_login(team.database, team.group, admin["email"])
    try:
        for slug in ("one", "two"):
            assert support.run_cli(["create", *ws(workspace), "--slug", slug, "--display-name", "T", "--token-name",
                                    "t", "--scopes", "boards:read", "--confirm"], dsn).code == 0
        assert support.run_cli(["audit", "verify", *ws(workspace)], dsn).code == 0
        for change in ("login = NULL", "hash = agent_audit_event_hash(e)"):  # (the second sees the first)
            support.outside_the_tool(team.conn, f"""UPDATE agent_audit_event e SET {change}
                                                    WHERE e."workspaceId" = %s AND e."sequence" = 2""",
                                     (workspace["id"],))
        verified = support.run_cli(["audit", "verify", *ws(workspace), "--json"], dsn)
        assert verified.code == 10, verified.stdout
        assert verified.json["workspaces"][0]["break"]["message"] == \
            "event 2 records no login, though an event before it does: its login was taken away"
    finally:
        support.drop_role(team.database, login)
