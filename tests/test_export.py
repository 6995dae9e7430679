"""The audit log leaves the database and is still checkable: `audit --jsonl` carries every
value of each event's hash, an export of every workspace streams in chain order and
resumes where a shipper stopped, `audit verify --file` checks an export with no
database (and catches, against an earlier export, a rewrite that re-hashed the chain to
its end), and pinned heads name their workspace and say when they were checked."""

import json

import psycopg
import pytest

import agent_identity_admin as tool
from tests import support


# Tests here rewrite the log past its triggers: a database of their own.
database, cli_dsn = support.own_database_fixtures()


def exported(operator, *args: str) -> list[dict]:
    run = operator.cli("audit", "--jsonl", "--all", *args, env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert run.code == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


def offline(cli, *args: str) -> support.Run:
    """audit verify with no database at all: no DSN, no actor."""
    return cli("audit", "verify", "--json", *args, dsn=None, env={"PGHOST": "/nonexistent", "PGCONNECT_TIMEOUT": "1"})


def test_every_value_of_the_hash_is_in_the_export(db, operator):
    operator.create("exported", "--reason", "ünïcödé, \"quotes\" & 1:2,3")
    operator("rotate", "--slug", "exported", "--grace", "1h", "--confirm")
    w = ["--workspace-public-id", operator.workspace["publicId"]]
    events = exported(operator, *w)
    stored = db.execute("""SELECT "publicId", "createdAt", "hash" FROM agent_audit_event
                           WHERE "workspaceId" = %s ORDER BY "sequence" DESC""",
                        (operator.workspace["id"],)).fetchall()
    assert [(e["publicId"], tool.from_iso(e["createdAt"]), e["hash"]) for e in events] == stored
    assert any(tool.from_iso(e["createdAt"]).microsecond for e in events), "time to the microsecond"
    for event in events:
        recomputed = tool.exported_event(json.dumps(event), "line")
        assert tool.chain_hash(event["previousHash"], recomputed) == event["hash"]


def test_every_workspace_streams_in_chain_order_and_resumes(kan, cli, operator):
    other = kan.workspace()
    kan.member(other, {"id": db_user_id(kan, operator.email), "email": operator.email})
    operator.create("first")
    operator.create("second")
    second = support.Operator(cli, other, operator.email)
    second.create("elsewhere")
    events = exported(operator)
    by_workspace = {}
    for event in events:
        by_workspace.setdefault(event["workspacePublicId"], []).append(event["sequence"])
    assert by_workspace[operator.workspace["publicId"]] == list(range(1, 3))
    assert by_workspace[other["publicId"]] == [1]
    resumed = exported(operator, "--after-sequence", f"{operator.workspace['publicId']}:1")
    assert [(e["workspacePublicId"], e["sequence"]) for e in resumed] == [
        (w, s) for w, s in ((e["workspacePublicId"], e["sequence"]) for e in events)
        if not (w == operator.workspace["publicId"] and s <= 1)]
    page = operator("audit", "--after-sequence", "0", "--limit", "1", json=False)
    assert page.code == 0
    assert f"more: add --after-sequence {operator.workspace['publicId']}:1" in page.stderr
    rest = operator("audit", "--after-sequence", f"{operator.workspace['publicId']}:1").json
    assert [e["sequence"] for e in rest["events"]] == [2]


def db_user_id(kan, email: str) -> int:
    return kan.conn.execute('SELECT "id" FROM "user" WHERE email = %s', (email,)).fetchone()[0]


@pytest.mark.parametrize("args, message", [
    (["--after-sequence", "3", "--since", "1h"], "--since filters a listing"),
    (["--jsonl", "--all", "--slug", "x"], "--slug filters a listing"),
])
def test_a_chain_in_order_is_listed_whole(cli, operator, args, message):
    w = [] if "--all" in args else ["--workspace-public-id", operator.workspace["publicId"]]
    run = cli("audit", *w, *args, env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert run.code == 2 and message in run.stderr


def test_an_export_verifies_with_no_database_and_a_tampered_line_breaks(cli, operator, tmp_path):
    operator.create("offline-one")
    operator.create("offline-two")
    operator("pause", "--all", "--confirm")
    export = tmp_path / "audit.jsonl"
    export.write_text("".join(json.dumps(e) + "\n" for e in exported(operator)))
    run = offline(cli, "--file", str(export))
    assert run.code == 0, run.stdout + run.stderr
    [report] = run.json["workspaces"]
    assert (report["intact"], report["events"], run.json["checked"]) == (True, 4, {"workspaces": 1, "events": 4})
    lines = export.read_text().splitlines()
    event = json.loads(lines[1])
    event["reason"] = "nothing to see"
    lines[1] = json.dumps(event)
    export.write_text("\n".join(lines) + "\n")
    run = offline(cli, "--file", str(export))
    assert run.code == 10
    [report] = run.json["workspaces"]
    assert (report["break"]["kind"], report["break"]["sequence"]) == ("changed", event["sequence"])


def test_an_earlier_export_catches_a_rewrite_the_database_calls_intact(db, cli, operator, tmp_path):
    for slug in ("kept-1", "kept-2", "kept-3", "kept-4"):
        operator.create(slug)
    monday = tmp_path / "monday.jsonl"
    monday.write_text("".join(json.dumps(e) + "\n" for e in exported(operator)))
    # A superuser rewrites event 2 and re-hashes every event after it, as the trigger would.
    support.outside_the_tool(db, """
        DO $$ DECLARE e agent_audit_event;
        BEGIN
            UPDATE agent_audit_event SET reason = 'rewritten' WHERE "workspaceId" = %s AND "sequence" = 2;
            FOR e IN SELECT * FROM agent_audit_event WHERE "workspaceId" = %s AND "sequence" >= 2
                     ORDER BY "sequence" LOOP
                e."previousHash" := (SELECT p."hash" FROM agent_audit_event p
                                     WHERE p."workspaceId" = e."workspaceId" AND p."sequence" = e."sequence" - 1);
                UPDATE agent_audit_event SET "previousHash" = e."previousHash", "hash" = agent_audit_event_hash(e)
                WHERE "publicId" = e."publicId";
            END LOOP;
        END $$""".replace("%s", str(int(operator.workspace["id"]))))
    assert operator("audit", "verify").code == 0, "the chain alone cannot tell"
    today = tmp_path / "today.jsonl"
    today.write_text("".join(json.dumps(e) + "\n" for e in exported(operator)))
    assert offline(cli, "--file", str(today)).code == 0, "nor can today's export alone"
    run = offline(cli, "--file", str(monday), "--file", str(today))
    assert run.code == 10
    [report] = run.json["workspaces"]
    assert (report["break"]["kind"], report["break"]["sequence"]) == ("diverged", 2)
    assert f"differs between {monday} and {today}" in report["break"]["message"]
    text = cli("audit", "verify", "--file", str(monday), "--file", str(today), dsn=None)
    assert text.code == 10 and "(diverged)" in text.stdout


@pytest.mark.parametrize("content, message", [
    ("", "no audit events in"),
    ("not json\n", "line 1 is not an audit event"),
    ('{"publicId": "x"}\n', "line 1 is not an audit event of `agent-identity audit --jsonl` (no sequence)"),
])
def test_an_export_that_is_no_export_is_refused(cli, tmp_path, content, message):
    export = tmp_path / "bad.jsonl"
    export.write_text(content)
    run = cli("audit", "verify", "--file", str(export), dsn=None)
    assert (run.code, run.stdout) == (2, "")
    assert message in run.stderr


def test_pins_name_their_workspace_and_say_they_were_checked(cli, operator, tmp_path):
    operator.create("pinned")
    head = operator("audit", "head").json["workspaces"][0]
    assert head["pin"] == f"{operator.workspace['publicId']}:{head['sequence']}:{head['hash']}"
    text = operator("audit", "head", json=False)
    assert head["pin"] in text.stdout
    pins = tmp_path / "pins.txt"
    pins.write_text(text.stdout + "other: head Zz99Zz99Zz99:3:" + "b" * 64 + "\n")
    run = operator("audit", "verify", "--expect-heads", str(pins), json=False)
    assert run.code == 0 and f"pinned {head['head']} held" in run.stdout
    run = operator("audit", "verify", "--expect-head", head["pin"])
    assert (run.code, run.json["pinsChecked"], run.json["workspaces"][0]["pins"]) == (0, 1, [head["head"]])
    unpinned = operator("audit", "verify")
    assert (unpinned.json["pinsChecked"], unpinned.json["workspaces"][0]["pins"]) == (0, [])
    elsewhere = operator("audit", "verify", "--expect-head", "Zz99Zz99Zz99:3:" + "b" * 64, json=False)
    assert elsewhere.code == 2 and "workspace Zz99Zz99Zz99 is not one verified here" in elsewhere.stderr
    none_here = tmp_path / "none.txt"
    none_here.write_text("Zz99Zz99Zz99:3:" + "b" * 64 + "\n")
    run = operator("audit", "verify", "--expect-heads", str(none_here), json=False)
    assert run.code == 2 and "pins no head of the workspace verified" in run.stderr


@pytest.mark.parametrize("command", [["expiring"], ["audit", "verify"], ["audit", "head"],
                                     ["audit", "--jsonl", "--all"]])
def test_a_judgement_of_nothing_is_never_success(cli, kan, command):
    stranger = cli(*command, env={"AGENT_IDENTITY_ADMIN_EMAIL": "typo@example.com"})
    assert (stranger.code, stranger.stdout) == (4, ""), stranger.stderr
    assert stranger.stderr == "agent-identity: error: no Kan user has the email \"typo@example.com\": nothing was checked\n"
    bystander = kan.user()
    idle = cli(*command, env={"AGENT_IDENTITY_ADMIN_EMAIL": bystander["email"]})
    assert idle.code == 4 and "manages no workspace: nothing was checked" in idle.stderr


@pytest.mark.parametrize("command", [["expiring"], ["audit", "verify"], ["audit", "head"]])
def test_a_judgement_says_what_it_checked(cli, kan, command):
    workspace, admin = kan.managed_workspace()
    operator = support.Operator(cli, workspace, admin["email"])
    operator.create("counted-1")
    operator.create("counted-2")
    run = cli(*command, "--json", env={"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})
    assert run.json["checked"] == {"workspaces": 1, "identities": 2}, run.stdout


def test_the_schema_missing_is_exit_6_with_its_fix(server_dsn, kan):
    with support.own_database(server_dsn) as bare:
        with psycopg.connect(bare, autocommit=True) as conn:
            conn.execute("DROP FUNCTION agent_audit_chain_head(bigint) CASCADE")
            workspace, admin = support.Kan(conn).managed_workspace()
        run = support.run_cli(["audit", "head"], bare, {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})
    assert run.code == 6, run.stderr
    assert "agent-identity schema" in run.stderr and "Traceback" not in run.stderr


# --- what an attacker does to exports and pins ------------------------------------------


def test_two_pins_at_one_sequence_are_each_checked():
    events = chain_of(3)
    forged = "f" * 64
    report = tool.check_chain(events, (tool.Head(3, events[-1]["hash"]), tool.Head(3, forged)))
    assert [(b["kind"], b["sequence"]) for b in report["breaks"]] == [("head_mismatch", 3)]


def chain_of(count: int, start: int = 1, previous: str = tool.CHAIN_START) -> list[dict]:
    """A chain of events as the database writes them, hashed by the tool's own encoding."""
    from datetime import datetime, timedelta

    events = []
    for sequence in range(start, start + count):
        event = {"sequence": sequence, "workspacePublicId": "Ab12Cd34Ef56", "publicId": f"Ev{sequence:010d}",
                 "action": "identity.paused", "identityPublicId": "Id1234567890", "identitySlug": "bot",
                 "slug": "bot", "tokenPublicId": None, "actorUserUuid": None, "actorEmail": "a@example.com",
                 "reason": None, "metadata": "{}", "metadataText": "{}",
                 "createdAt": datetime(2026, 1, 1) + timedelta(seconds=sequence), "previousHash": previous}
        event["hash"] = previous = tool.chain_hash(previous, event)
        events.append(event)
    return events


def written(path, events) -> str:
    path.write_text("".join(json.dumps({**{k: e[k] for k in tool.EXPORT_FIELDS},
                                        "createdAt": tool.chain_time(e["createdAt"])}) + "\n" for e in events))
    return str(path)


@pytest.mark.parametrize("later, kind, message", [
    (lambda e: e[:4] + e[6:8], "diverged", "event 5, in"),  # deleted from the middle
    (lambda e: e[:7], "diverged", "ends at event 7, before event 10"),  # cut off at the end
    (lambda e: e[11:], "diverged", "events 11 to 11 are in neither"),  # a gap between exports
])
def test_an_export_is_held_to_the_exports_before_it(cli, tmp_path, later, kind, message):
    events = chain_of(12)
    old = written(tmp_path / "old.jsonl", events[:10])
    new = written(tmp_path / "new.jsonl", later(events))
    run = offline(cli, "--file", old, "--file", new)
    assert run.code == 10, run.stdout
    [report] = run.json["workspaces"]
    assert [b["kind"] for b in report["breaks"]].count(kind) >= 1
    assert any(message in b["message"] for b in report["breaks"]), report["breaks"]


def test_an_earlier_export_altered_is_caught_on_its_own(cli, tmp_path):
    events = chain_of(5)
    altered = [dict(e) for e in events]
    altered[2]["reason"] = "nothing to see"  # its hash left as it was
    run = offline(cli, "--file", written(tmp_path / "old.jsonl", altered), "--file",
                  written(tmp_path / "new.jsonl", events))
    assert run.code == 10
    kinds = [(b["kind"], b["sequence"]) for b in run.json["workspaces"][0]["breaks"]]
    assert ("changed", 3) in kinds and ("diverged", 3) in kinds


def test_a_first_event_that_starts_nothing_is_a_break(cli, tmp_path):
    events = chain_of(3, previous="a" * 64)
    run = offline(cli, "--file", written(tmp_path / "e.jsonl", events))
    assert run.code == 10 and run.json["workspaces"][0]["break"]["sequence"] == 1


def test_unchained_events_travel_in_every_export_and_are_named_offline(db, cli, operator, tmp_path):
    operator.create("chained")
    support.outside_the_tool(db, """INSERT INTO agent_audit_event ("publicId", "workspaceId", action, "actorEmail")
                                    VALUES ('PastTrigger1', %s, 'access.denied', 'x@example.com')""",
                             (operator.workspace["id"],))
    for args in ([], ["--workspace-public-id", operator.workspace["publicId"]]):  # chain order; newest first
        export = tmp_path / f"e{len(args)}.jsonl"
        export.write_text("".join(json.dumps(e) + "\n" for e in exported(operator, *args)))
        run = offline(cli, "--file", str(export))
        assert run.code == 10, run.stdout + run.stderr
        assert [b["kind"] for b in run.json["workspaces"][0]["breaks"] if b["kind"] == "unchained"] == ["unchained"]


@pytest.mark.parametrize("line, expected", [
    ("acme (Ab12Cd34Ef56): head Ab12Cd34Ef56:3:" + "ab" * 32 + " (2026-01-01T00:00:00.000000Z)", True),
    ("Ab12Cd34Ef56:3:" + "AB" * 32, True),
    ('{"workspaces": [{"pin": "Ab12Cd34Ef56:3:' + "ab" * 32 + '"}]}', True),
    ("evil-Zz99Zz99Zz99:7:" + "cd" * 32 + " (Ab12Cd34Ef56): no chained events yet", False),
    ('{"head": "3:' + "ab" * 32 + '"}', False),
])
def test_a_pins_file_is_read_as_audit_head_writes_it(tmp_path, line, expected):
    pins = tmp_path / "pins.txt"
    pins.write_text(line + "\n")
    assert tool.read_pins(str(pins)) == ([tool.Pin("Ab12Cd34Ef56", tool.Head(3, "ab" * 32))] if expected else [])


@pytest.mark.parametrize("value", ['"createdAt": "2026-01-01T00:00:00+00:00"', '"previousHash": "zz"',
                                   '"sequence": "1"'])
def test_an_export_line_with_a_value_no_export_writes_is_refused(cli, tmp_path, value):
    events = chain_of(1)
    line = json.loads(written(tmp_path / "ok.jsonl", events) and (tmp_path / "ok.jsonl").read_text())
    key, raw = value.split(": ", 1)
    line[json.loads(key)] = json.loads(raw)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(line) + "\n")
    run = cli("audit", "verify", "--file", str(bad), dsn=None)
    assert run.code == 2 and "is not an audit event" in run.stderr, run.stderr


def test_a_position_for_a_workspace_not_exported_is_refused(operator):
    run = operator.cli("audit", "--jsonl", "--all", "--after-sequence", "Zz99Zz99Zz99:4",
                       env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert run.code == 2 and "--after-sequence names Zz99Zz99Zz99" in run.stderr
