"""The audit log's hash chain: written by the database in the event's own statement,
append-only for every role, and checked by `audit verify` — which catches what an attacker
with the triggers disabled (a superuser) does to the rows."""

import json
import subprocess
import sys
import time
from datetime import datetime

import psycopg
import pytest

import agent_identity_admin as tool
from tests import support
from tests.conftest import LEAST_PRIVILEGE


@pytest.fixture(scope="module")
def database(server_dsn):
    """This module's own database: tampering with the log, as these tests do, must not
    break the chains that other tests' doctor runs check across the shared one."""
    dsn = support.create_database(server_dsn)
    yield dsn
    support.drop_database(server_dsn, dsn)


@pytest.fixture(scope="module")
def cli_dsn(database):
    with support.cli_role(database, least_privilege=LEAST_PRIVILEGE) as dsn:
        yield dsn


def chain(db, workspace: dict) -> list[dict]:
    return db.cursor(row_factory=psycopg.rows.dict_row).execute(
        """SELECT "publicId", "sequence", action, "identitySlug", "identityPublicId", "tokenPublicId",
                  "workspacePublicId", "actorUserUuid", "previousHash", "hash", "createdAt"
           FROM agent_audit_event WHERE "workspaceId" = %s ORDER BY "sequence" NULLS LAST, id""",
        (workspace["id"],)).fetchall()


def verified(operator, *args):
    run = operator.cli("audit", "verify", "--workspace-public-id", operator.workspace["publicId"], "--json", *args,
                       env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert run.stdout, run.stderr
    [report] = run.json["workspaces"]
    return run, report


def head_of(operator) -> str:
    run = operator.cli("audit", "head", "--workspace-public-id", operator.workspace["publicId"], "--json",
                       env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert run.code == 0, run.stdout
    return run.json["workspaces"][0]["head"]


@pytest.fixture
def history(operator, kan, cli):
    """Six events, each a different way of writing one: create (two), rotate, pause --all
    (a bulk statement), revoke of one token, and a refusal (access.denied)."""
    first = operator.create("chain-one").json
    operator.create("chain-two")
    operator("rotate", "--slug", "chain-two", "--reason", "routine: ünïcödé, \"quotes\" & 1:2,3", "--confirm")
    operator("pause", "--all", "--reason", "drill", "--confirm")
    outsider = kan.user()
    refused = cli("inspect", "--workspace-public-id", operator.workspace["publicId"], "--slug", "chain-one",
                  env={"AGENT_IDENTITY_ADMIN_EMAIL": outsider["email"]})
    assert refused.code == 4
    return first


def tamper(db, statement: str, params=()) -> None:
    """What an attacker with a superuser's access does: write with the triggers off."""
    with db.transaction():
        db.execute("SET LOCAL session_replication_role = replica")
        db.execute(statement, params)


# --- written by the database, in the event's own statement --------------------------


def test_every_way_of_writing_an_event_extends_the_chain(db, operator, history):
    events = chain(db, operator.workspace)
    assert [e["sequence"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e["action"] for e in events] == ["identity.created", "identity.created", "identity.token_rotated",
                                             "identity.paused", "identity.paused", "access.denied"]
    assert events[0]["previousHash"] == "0" * 64
    assert all(later["previousHash"] == earlier["hash"] for earlier, later in zip(events, events[1:]))
    assert all(earlier["createdAt"] <= later["createdAt"] for earlier, later in zip(events, events[1:]))
    # The chain names what each event is about by values no cascade changes.
    assert (events[0]["identitySlug"], events[0]["identityPublicId"], events[0]["tokenPublicId"]) == \
        ("chain-one", history["identity"]["publicId"], history["token"]["publicId"])
    assert {e["workspacePublicId"] for e in events} == {operator.workspace["publicId"]}
    run, report = verified(operator)
    assert run.code == 0, run.stdout
    assert (report["intact"], report["events"], report["head"]) == (True, 6, f"6:{events[-1]['hash']}")
    assert head_of(operator) == report["head"]


def test_writing_still_takes_the_same_round_trips(cli_dsn, operator):
    operator.create("counted")
    code, trips, statements = support.round_trips(
        ["pause", "--workspace-public-id", operator.workspace["publicId"], "--slug", "counted", "--confirm"],
        cli_dsn, operator.email)
    assert code == 0 and trips <= 4, statements


# --- append-only for every role ----------------------------------------------------


@pytest.mark.parametrize("statement, refusal", [
    ("""UPDATE agent_audit_event SET reason = 'rewritten' WHERE "workspaceId" = %s""", "may not be changed"),
    ("""UPDATE agent_audit_event SET "actorEmail" = 'someone@example.com' WHERE "workspaceId" = %s""",
     "may not be changed"),
    ("""UPDATE agent_audit_event SET "hash" = repeat('0', 64) WHERE "workspaceId" = %s""", "may not be changed"),
    ("""DELETE FROM agent_audit_event WHERE "workspaceId" = %s""", "may not be deleted"),
    ("""TRUNCATE agent_audit_event""", "may not be truncated"),
])
def test_the_owner_cannot_rewrite_or_remove_an_event(db, operator, history, statement, refusal):
    before = chain(db, operator.workspace)
    with pytest.raises(psycopg.errors.CheckViolation, match=f"agent_audit_event is append-only: .*{refusal}"):
        db.execute(statement, (operator.workspace["id"],) if "%s" in statement else ())
    assert chain(db, operator.workspace) == before
    assert db.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0], \
        "refused although the session is a superuser and the table's owner"


@pytest.mark.skipif(support.PROVEN, reason=support.NAMES_WHAT_IT_AIMED_AT)
def test_kans_cascades_still_work_and_leave_the_chain_intact(db, operator, history):
    # An identity deleted by hand: its events keep their place, their foreign keys go NULL.
    db.execute('DELETE FROM agent_identity WHERE "publicId" = %s', (history["identity"]["publicId"],))
    orphaned = db.execute("""SELECT count(*) FROM agent_audit_event
                             WHERE "identityPublicId" = %s AND "agentIdentityId" IS NULL""",
                          (history["identity"]["publicId"],)).fetchone()[0]
    assert orphaned == 3  # created, paused by the batch, and the refusal
    run, report = verified(operator)
    assert (run.code, report["intact"], report["events"]) == (0, True, 6)
    # Kan hard-deleting the workspace takes its events with it.
    db.execute("DELETE FROM workspace WHERE id = %s", (operator.workspace["id"],))
    assert chain(db, operator.workspace) == []


def test_a_deleted_kan_user_leaves_the_chain_intact(db, kan, cli, operator):
    """Kan deleting a user sets actorUserId to NULL in every event they wrote (a cascade
    the append-only trigger lets through); the chain keeps their id in actorUserUuid."""
    helper = kan.user()
    # A member whose membership someone else created, so that Kan lets the user go.
    db.execute("""INSERT INTO workspace_members ("publicId", email, "userId", "workspaceId", "createdBy", role, status)
                  VALUES (%s, %s, %s, %s, (SELECT id FROM "user" WHERE email = %s), 'admin', 'active')""",
               (tool.new_public_id(), helper["email"], helper["id"], operator.workspace["id"], operator.email))
    helped = cli("create", "--workspace-public-id", operator.workspace["publicId"], "--slug", "helped",
                 "--display-name", "H", "--token-name", "t", "--scopes", "boards:read", "--confirm",
                 env={"AGENT_IDENTITY_ADMIN_EMAIL": helper["email"]})
    assert helped.code == 0, helped.stderr
    db.execute('DELETE FROM workspace_members WHERE "userId" = %s', (helper["id"],))
    db.execute('DELETE FROM "user" WHERE id = %s', (helper["id"],))
    [event] = db.execute("""SELECT "actorUserId", "actorUserUuid", "actorEmail" FROM agent_audit_event
                            WHERE "workspaceId" = %s AND "identitySlug" = 'helped'""",
                         (operator.workspace["id"],)).fetchall()
    assert event == (None, helper["id"], helper["email"])
    run, report = verified(operator)
    assert (run.code, report["intact"]) == (0, True)


# --- audit verify catches what a superuser does with the triggers off --------------


def test_a_changed_reason_is_a_changed_event(db, operator, history):
    tamper(db, """UPDATE agent_audit_event SET reason = 'nothing to see' WHERE "workspaceId" = %s AND "sequence" = 3""",
           (operator.workspace["id"],))
    run, report = verified(operator)
    assert run.code == 10 and run.json["ok"] is False
    assert [(b["kind"], b["sequence"]) for b in report["breaks"]] == [("changed", 3)], "one change, one break"
    assert report["break"] == report["breaks"][0]
    assert report["events"] == 6, "every event was checked"
    text = operator.cli("audit", "verify", "--workspace-public-id", operator.workspace["publicId"],
                        env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert text.code == 10
    assert text.stdout.splitlines() == [
        f"✗ {db.execute('SELECT slug FROM workspace WHERE id = %s', (operator.workspace['id'],)).fetchone()[0]} "
        f"({operator.workspace['publicId']}): broken at 3 (changed): event 3 was changed: it no longer hashes to "
        "its recorded hash",
        f"  checked 6 events, head {report['head']}"]


def test_a_deleted_event_is_a_gap(db, operator, history):
    tamper(db, """DELETE FROM agent_audit_event WHERE "workspaceId" = %s AND "sequence" = 4""",
           (operator.workspace["id"],))
    run, report = verified(operator)
    assert run.code == 10
    # Event 4 paused chain-one: the gap, and the table that now says more than the chain.
    assert [(b["kind"], b["sequence"]) for b in report["breaks"]] == [("gap", 4), ("mismatch", 1)]
    assert report["breaks"][1]["message"].endswith("is paused, but event 1 made it active")
    assert report["events"] == 5


# Every field of the encoding, changed past the triggers, is a changed event: no field can
# fall out of the encoding (in Python and SQL alike) unseen, with or without Node.
FIELDS = {
    "workspacePublicId": "'Zz99Zz99Zz99'", "publicId": "'Zz99Zz99Zz98'", "action": "'identity.resumed'",
    "identityPublicId": "'Zz99Zz99Zz97'", "identitySlug": "'someone-else'", "tokenPublicId": "'Zz99Zz99Zz96'",
    "actorUserUuid": "gen_random_uuid()", "actorEmail": "'someone@example.com'", "reason": "'another reason'",
    "metadata": """metadata || '{"forged": true}'""", "createdAt": """"createdAt" + interval '1 microsecond'""",
}


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_a_change_to_any_field_of_the_encoding_is_a_changed_event(db, operator, history, field):
    tamper(db, f"""UPDATE agent_audit_event SET "{field}" = {FIELDS[field]}
                   WHERE "workspaceId" = %s AND "sequence" = 3""", (operator.workspace["id"],))
    run, report = verified(operator)
    assert run.code == 10
    assert (report["break"]["kind"], report["break"]["sequence"]) == ("changed", 3), report["breaks"]


def test_times_never_run_backwards_along_a_chain(db, database, operator):
    """A transaction that began first but wrote second gets the time of the event before
    it, not its own earlier one: along a chain, times only go forward."""
    with psycopg.connect(database) as early:
        began = early.execute("SELECT timezone('utc', now())").fetchone()[0]  # the transaction's clock starts
        time.sleep(0.05)
        operator.create("meanwhile")
        early.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", action, "actorEmail")
                         VALUES ('LateWriter01', %s, 'access.denied', 'late@example.com')""",
                      (operator.workspace["id"],))
        early.commit()
    events = chain(db, operator.workspace)
    assert [e["publicId"] for e in events][-1] == "LateWriter01"
    assert events[-1]["createdAt"] >= events[-2]["createdAt"] > began
    assert verified(operator)[0].code == 0


@pytest.mark.parametrize("swap", ["sequence", "createdAt"])
def test_swapped_events_are_reordered(db, operator, history, swap):
    events = chain(db, operator.workspace)
    second, third = events[1], events[2]
    with db.transaction():
        db.execute("SET LOCAL session_replication_role = replica")
        # In two steps: the unique (workspace, sequence) index holds after each statement.
        placeholder = {"sequence": -1, "createdAt": datetime(1970, 1, 1)}[swap]
        for event, value in ((second, placeholder), (third, second[swap]), (second, third[swap])):
            db.execute(f"""UPDATE agent_audit_event SET "{swap}" = %s WHERE "publicId" = %s""",
                       (value, event["publicId"]))
    run, report = verified(operator)
    assert run.code == 10
    assert (report["break"]["kind"], report["break"]["sequence"]) == ("reordered", 2), report


def test_a_rewrite_that_recomputes_every_later_hash_fails_only_the_pinned_head(db, operator, history):
    pinned = head_of(operator)
    # The attacker inserts a forged event at 3, moves the later ones up, and recomputes
    # every hash from there on, with the database's own function: the chain is whole again.
    workspace_id = operator.workspace["id"]
    with db.transaction():
        db.execute("SET LOCAL session_replication_role = replica")
        db.execute("""UPDATE agent_audit_event SET "sequence" = -"sequence"
                      WHERE "workspaceId" = %s AND "sequence" >= 3""", (workspace_id,))
        db.execute("""UPDATE agent_audit_event SET "sequence" = 1 - "sequence"
                      WHERE "workspaceId" = %s AND "sequence" < 0""", (workspace_id,))
        db.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", action, "actorEmail", reason,
                                                     "workspacePublicId", "sequence", "createdAt", login)
                      SELECT 'Forged000001', %s, 'identity.resumed', 'admin@example.com', 'approved', %s, 3,
                             e."createdAt", e.login
                      FROM agent_audit_event e WHERE e."workspaceId" = %s AND e."sequence" = 2""",
                   (workspace_id, operator.workspace["publicId"], workspace_id))
        db.execute("""DO $$
            DECLARE e agent_audit_event;
            BEGIN
                FOR e IN SELECT * FROM agent_audit_event WHERE "workspaceId" = %s AND "sequence" >= 3
                         ORDER BY "sequence" LOOP
                    e."previousHash" := (SELECT p."hash" FROM agent_audit_event p
                                         WHERE p."workspaceId" = e."workspaceId" AND p."sequence" = e."sequence" - 1);
                    UPDATE agent_audit_event SET "previousHash" = e."previousHash",
                                                 "hash" = agent_audit_event_hash(e)
                    WHERE "publicId" = e."publicId";
                END LOOP;
            END $$""".replace("%s", str(int(workspace_id))))
    run, report = verified(operator)
    assert (run.code, report["intact"], report["events"]) == (0, True, 7), "the chain alone cannot tell"
    run, report = verified(operator, "--expect-head", pinned)
    assert run.code == 10
    assert (report["break"]["kind"], report["break"]["sequence"]) == ("head_mismatch", 6)
    assert (run.json["pinsChecked"], report["pins"]) == (1, [pinned])


def test_a_cut_off_end_fails_the_pinned_head(db, operator, history):
    pinned = head_of(operator)
    assert verified(operator, "--expect-head", pinned)[0].code == 0
    tamper(db, """DELETE FROM agent_audit_event WHERE "workspaceId" = %s AND "sequence" = 6""",
           (operator.workspace["id"],))
    run, report = verified(operator)
    assert (run.code, report["intact"]) == (0, True)
    run, report = verified(operator, "--expect-head", pinned)
    assert run.code == 10
    assert [b["kind"] for b in report["breaks"]] == ["head_mismatch"]
    assert report["break"]["message"].startswith(f"the chain ends at 5, before the pinned head ({pinned})")


def test_an_event_written_past_the_trigger_is_unchained(db, operator, history):
    tamper(db, """INSERT INTO agent_audit_event ("publicId", "workspaceId", action, "actorEmail")
                  VALUES ('Sneaked00001', %s, 'identity.resumed', 'x@example.com')""", (operator.workspace["id"],))
    run, report = verified(operator)
    assert run.code == 10
    assert (report["break"]["kind"], report["break"]["eventPublicId"], report["events"]) == \
        ("unchained", "Sneaked00001", 6)
    doctor = operator.cli("doctor", "--json", env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert doctor.code == 6
    [mine] = [c for c in doctor.json["chains"] if c["workspacePublicId"] == operator.workspace["publicId"]]
    assert mine["state"] == "broken"


# --- who may verify, and how it is asked --------------------------------------------


def test_verify_without_a_workspace_checks_every_one_the_actor_manages(db, kan, cli):
    admin = kan.user()
    workspaces = [kan.workspace() for _ in range(2)]
    for workspace in workspaces:
        kan.member(workspace, admin)
        support.Operator(cli, workspace, admin["email"]).create("bot")
    elsewhere = kan.managed_workspace()[0]  # someone else's: not looked at
    run = cli("audit", "verify", "--json", env={"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})
    assert run.code == 0
    assert {w["workspacePublicId"] for w in run.json["workspaces"]} == {w["publicId"] for w in workspaces}
    assert elsewhere["publicId"] not in run.stdout


def test_an_outsider_may_not_verify_and_is_audited(db, kan, cli, operator, history):
    outsider = kan.user()
    before = support.snapshot(db)
    run = cli("audit", "verify", "--workspace-public-id", operator.workspace["publicId"], "--json",
              env={"AGENT_IDENTITY_ADMIN_EMAIL": outsider["email"]})
    assert run.code == 4 and "head" not in run.stdout
    [event] = support.added_rows(before, support.snapshot(db))["agent_audit_event"]
    assert (event["action"], event["metadata"]["command"]) == ("access.denied", "audit")


@pytest.mark.parametrize("args, message", [
    (["verify", "--since", "24h"], "audit verify looks at whole chains: --since is for listing events"),
    (["head", "--jsonl"], "audit head looks at whole chains: --jsonl is for listing events"),
    (["--expect-head", "1:" + "a" * 64], "--expect-head goes with audit verify"),
    (["verify", "--expect-head", "1:xyz"], "must be WORKSPACE:SEQUENCE:HASH"),
])
def test_chain_usage_errors(operator, args, message):
    run = operator.cli("audit", "--workspace-public-id", operator.workspace["publicId"], *args,
                       env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert run.code == 2 and message in run.stderr, run.stderr


def test_expect_head_needs_one_workspace(operator):
    run = operator.cli("audit", "verify", "--expect-head", "1:" + "a" * 64,
                       env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert run.code == 2 and "names no workspace: give it as WORKSPACE:SEQUENCE:HASH" in run.stderr


# --- concurrency: one workspace's writers take turns; other workspaces never wait ---


def test_sixteen_concurrent_changes_in_one_workspace_all_land_in_one_chain(db, cli_dsn, operator):
    slugs = [f"racer-{number}" for number in range(16)]
    for slug in slugs:
        operator.create(slug)
    before = len(chain(db, operator.workspace))
    processes = [support.start_cli(["pause", "--workspace-public-id", operator.workspace["publicId"], "--slug", slug,
                                    "--confirm", "--json"], cli_dsn, {"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
                 for slug in slugs]
    results = [(process.wait(timeout=120), process.stdout.read(), process.stderr.read()) for process in processes]
    assert [code for code, _, _ in results] == [0] * 16, [err for _, _, err in results]
    events = chain(db, operator.workspace)
    assert len(events) == before + 16
    assert [e["sequence"] for e in events] == list(range(1, before + 17))
    run, report = verified(operator)
    assert (run.code, report["events"]) == (0, before + 16)


def test_creates_in_two_workspaces_at_once_make_two_intact_chains(db, kan, cli, cli_dsn):
    operators = []
    for _ in range(2):
        workspace, admin = kan.managed_workspace()
        operators.append(support.Operator(cli, workspace, admin["email"]))
    processes = [support.start_cli(["create", "--workspace-public-id", operator.workspace["publicId"], "--slug",
                                    f"twin-{number}", "--display-name", "T", "--token-name", "t", "--scopes",
                                    "boards:read", "--confirm", "--json"], cli_dsn,
                                   {"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
                 for number in range(8) for operator in operators]
    codes = [process.wait(timeout=120) for process in processes]
    assert codes == [0] * 16, [process.stderr.read() for process in processes]
    for operator in operators:
        assert [e["sequence"] for e in chain(db, operator.workspace)] == list(range(1, 9))
        run, report = verified(operator)
        assert (run.code, report["intact"], report["events"]) == (0, True, 8)


def test_a_held_chain_makes_its_workspace_wait_and_no_other(db, database, kan, cli_dsn, operator):
    other_workspace, other_admin = kan.managed_workspace()
    other = support.Operator(operator.cli, other_workspace, other_admin["email"])
    operator.create("waiting")
    # Another session writes an event in the operator's workspace and holds its transaction open.
    with psycopg.connect(database) as holder:
        holder.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", action, "actorEmail")
                          VALUES ('Holding00001', %s, 'identity.paused', 'holder@example.com')""",
                       (operator.workspace["id"],))
        started = time.monotonic()
        elsewhere = other.create("unhindered", "--lock-timeout", "2")
        assert elsewhere.code == 0 and time.monotonic() - started < 10
        blocked = operator("pause", "--slug", "waiting", "--lock-timeout", "1", "--confirm")
        assert blocked.code == 5, blocked.stdout
        holder.rollback()
    assert db.execute("""SELECT status FROM agent_identity WHERE slug = 'waiting' AND "workspaceId" = %s""",
                      (operator.workspace["id"],)).fetchone()[0] == "active", "nothing written"
    assert verified(operator)[0].code == 0 and verified(other)[0].code == 0


# --- upgrade in place ----------------------------------------------------------------


def test_applying_schema_chains_the_events_written_before_it_once(server_dsn):
    dsn = support.released_database(server_dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(support.WITHOUT_CHAIN_SQL)  # the database as version 0.2.0 of the tool left it
            kan = support.Kan(conn)
            operators = []
            for _ in range(2):
                workspace, admin = kan.managed_workspace()
                operators.append(support.Operator(None, workspace, admin["email"]))
        for number in range(3):
            for operator in operators:
                written = support.run_released(
                    ["create", "--workspace-public-id", operator.workspace["publicId"], "--slug", f"before-{number}",
                     "--display-name", "B", "--token-name", "t", "--scopes", "boards:read", "--confirm"], dsn,
                    {"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
                assert written.code == 0, written.stderr
        doctor = support.run_cli(["doctor"], dsn)
        assert doctor.code == 6 and 'agent_audit_event."sequence" is missing' in doctor.stdout
        schema = support.run_cli(["schema"], dsn).stdout
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(schema)
            first = conn.execute("""SELECT "publicId", "workspaceId", "sequence", "hash", "createdAt"
                                    FROM agent_audit_event ORDER BY "workspaceId", "sequence" """).fetchall()
            conn.execute(schema)  # again: nothing changes
            again = conn.execute("""SELECT "publicId", "workspaceId", "sequence", "hash", "createdAt"
                                    FROM agent_audit_event ORDER BY "workspaceId", "sequence" """).fetchall()
        assert first == again and len(first) == 6
        for workspace_id in {row[1] for row in first}:
            rows = [row for row in first if row[1] == workspace_id]
            assert [row[2] for row in rows] == [1, 2, 3]
            assert [row[4] for row in rows] == sorted(row[4] for row in rows), "in the order written"
        doctor = support.run_cli(["doctor", "--json"], dsn)
        assert doctor.code == 0, doctor.stdout
        assert [chain["state"] for chain in doctor.json["chains"]] == ["intact", "intact"]
        for operator in operators:
            run = support.run_cli(["audit", "verify", "--workspace-public-id", operator.workspace["publicId"]], dsn,
                                  {"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
            assert run.code == 0 and ": intact, 3 events, head 3:" in run.stdout
    finally:
        support.drop_database(server_dsn, dsn)


def test_upgrading_what_0_3_0_wrote_keeps_every_chain_and_every_token(server_dsn, tmp_path):
    """A database 0.3.0 made and wrote (every kind of event), upgraded in place by this
    version's schema: the same heads, intact chains that agree with their tables, the same
    token verdicts, doctor green; and the tool goes on from there."""
    dsn = support.released_database(server_dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            kan = support.Kan(conn)
            workspaces = [kan.managed_workspace() for _ in range(2)]
        tokens = {}
        for workspace, admin in workspaces:
            def old(*args):
                run = support.run_released([*args, "--workspace-public-id", workspace["publicId"], "--json"], dsn,
                                           {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})
                assert run.code in (0, 4), run.stderr
                return run.json
            for slug in ("kept", "rotated", "graced", "paused", "revoked", "one-token"):
                tokens[(workspace["publicId"], slug)] = old(
                    "create", "--slug", slug, "--display-name", "O", "--token-name", "t", "--scopes", "boards:read",
                    "--confirm")["token"]["secret"]
            tokens[(workspace["publicId"], "rotated-new")] = old("rotate", "--slug", "rotated", "--confirm")["token"]["secret"]
            tokens[(workspace["publicId"], "graced-new")] = old("rotate", "--slug", "graced", "--grace", "1h",
                                                              "--confirm")["token"]["secret"]
            old("pause", "--slug", "paused", "--confirm")
            old("revoke", "--slug", "revoked", "--confirm")
            second = old("rotate", "--slug", "one-token", "--grace", "1d", "--confirm")["token"]
            tokens[(workspace["publicId"], "one-token-new")] = second["secret"]
            old("revoke", "--slug", "one-token", "--token", second["publicId"], "--confirm")
            old("pause", "--all", "--confirm")
            denied = support.run_released(["inspect", "--workspace-public-id", workspace["publicId"], "--slug", "kept"],
                                          dsn, {"AGENT_IDENTITY_ADMIN_EMAIL": "nobody@example.com"})
            assert denied.code == 4

        def heads(run):
            return {w["workspacePublicId"]: w["head"] for w in run(["audit", "head", "--json"], dsn,
                                                                   {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}).json["workspaces"]}

        def verdicts(run):
            found = {}
            for (workspace_id, name), token in tokens.items():
                result = subprocess.run([sys.executable, str(run), "verify", "--json"], input=token + "\n",
                                        env=support.cli_env(dsn, AGENT_IDENTITY_ADMIN_EMAIL=owners[workspace_id]),
                                        capture_output=True, text=True, timeout=60)
                found[(workspace_id, name)] = json.loads(result.stdout)["reason"]
            return found

        owners = {workspace["publicId"]: admin["email"] for workspace, admin in workspaces}
        before_heads = {}
        for workspace, admin in workspaces:
            before_heads.update(heads(lambda a, d, e, admin=admin: support.run_released(
                a, d, {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})))
        before = verdicts(support.released_tool())
        assert before[(workspaces[0][0]["publicId"], "rotated-new")] == "identity_paused"  # paused by pause --all

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(support.run_cli(["schema"], None).stdout)
        after_heads = {}
        for workspace, admin in workspaces:
            after_heads.update(heads(lambda a, d, e, admin=admin: support.run_cli(
                a, d, {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})))
        assert after_heads == before_heads and all(before_heads.values())
        assert verdicts(support.SCRIPT) == before
        doctor = support.run_cli(["doctor", "--json"], dsn)
        assert doctor.code == 0, doctor.stdout
        for workspace, admin in workspaces:
            verified = support.run_cli(["audit", "verify", "--workspace-public-id", workspace["publicId"], "--json"], dsn,
                                       {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})
            assert (verified.code, verified.json["workspaces"][0]["breaks"]) == (0, [])
            resumed = support.run_cli(["resume", "--workspace-public-id", workspace["publicId"], "--all", "--confirm"],
                                      dsn, {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})
            assert resumed.code == 0, resumed.stderr
        assert support.run_cli(["doctor"], dsn).code == 0
    finally:
        support.drop_database(server_dsn, dsn)


def test_doctor_names_a_workspace_not_yet_chained(db, operator):
    operator.create("old-bot")
    tamper(db, """UPDATE agent_audit_event SET "sequence" = NULL, "previousHash" = NULL, "hash" = NULL
                  WHERE "workspaceId" = %s""", (operator.workspace["id"],))
    doctor = operator.cli("doctor", "--json", env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert doctor.code == 6
    [mine] = [c for c in doctor.json["chains"] if c["workspacePublicId"] == operator.workspace["publicId"]]
    assert mine["state"] == "not_chained"
    [line] = [c for c in doctor.json["checks"] if c["name"] == "audit chains"]
    assert "not yet chained: " in line["detail"] and "apply `agent-identity schema`" in line["fix"]


def test_doctor_says_when_a_trigger_of_the_chain_is_off(db, operator):
    db.execute("ALTER TABLE agent_audit_event DISABLE TRIGGER agent_audit_event_append_only")
    try:
        doctor = operator.cli("doctor", "--json", env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    finally:
        db.execute("ALTER TABLE agent_audit_event ENABLE TRIGGER agent_audit_event_append_only")
    assert doctor.code == 6
    [line] = [c for c in doctor.json["checks"] if c["name"] == "safeguards"]
    assert (line["ok"], line["detail"]) == (False, "trigger agent_audit_event_append_only does not fire here (disabled)")
    assert "agent-identity schema" in line["fix"]


# --- the spec, checked by an implementation written from it alone ------------------


def test_the_node_implementation_of_the_spec_agrees(db, operator, history, node_bin, database):
    completed = subprocess.run([str(node_bin / "tsx"), str(support.SERVER / "verify-audit-chain.ts"),
                                operator.workspace["publicId"]], env=support.node_env(database), capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr
    *lines, summary = [json.loads(line) for line in completed.stdout.splitlines()]
    stored = chain(db, operator.workspace)
    assert [line["hash"] for line in lines] == [event["hash"] for event in stored]
    assert all(line["linked"] for line in lines)
    assert summary == {"intact": True, "events": 6, "head": verified(operator)[1]["head"]}


def test_the_encoding_of_a_field():
    example = (tool.chain_field(tool.CHAIN_ENCODING) + tool.chain_field("1") + tool.chain_field("Ab12Cd34Ef56")).decode()
    assert f"`{example}`" in (support.REPO / "docs" / "schema.md").read_text(), "the spec's example"
    assert tool.chain_field(None) == b"-,"
    assert tool.chain_field("") == b"0:,"
    assert tool.chain_field("é,1:") == b"5:\xc3\xa9,1:,"
    assert tool.parse_pin(" 12:" + "AB" * 32) == tool.Pin(None, tool.Head(12, "ab" * 32))
    assert tool.parse_pin("Ab12Cd34Ef56:12:" + "AB" * 32) == tool.Pin("Ab12Cd34Ef56", tool.Head(12, "ab" * 32))
