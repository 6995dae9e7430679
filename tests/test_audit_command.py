"""`audit`: a workspace's events, newest first, filtered, paged, and streamed as JSON lines."""

import json
import subprocess

import pytest

from tests import support


@pytest.fixture
def story(db, operator):
    """A workspace with a short history: two identities created, one paused, a token rotated,
    and a refused attempt by an outsider."""
    first = operator.create("first-bot").json
    operator.create("second-bot")
    operator("pause", "--slug", "first-bot", "--reason", "investigating", "--confirm")
    rotated = operator("rotate", "--slug", "second-bot", "--reason", "routine", "--confirm").json
    return {"first": first, "rotated": rotated}


def actions(run) -> list[str]:
    return [event["action"] for event in run.json["events"]]


def test_events_come_newest_first_with_who_what_and_why(story, operator):
    shown = operator("audit")
    assert shown.code == 0, shown.stdout
    assert actions(shown) == ["identity.token_rotated", "identity.paused", "identity.created", "identity.created"]
    rotated, paused = shown.json["events"][:2]
    assert (rotated["slug"], rotated["reason"], rotated["actorEmail"], rotated["tokenPublicId"]) == \
        ("second-bot", "routine", operator.email, story["rotated"]["token"]["publicId"])
    assert (paused["slug"], paused["identityPublicId"], paused["reason"]) == \
        ("first-bot", story["first"]["identity"]["publicId"], "investigating")
    assert all(event["workspacePublicId"] == operator.workspace["publicId"] for event in shown.json["events"])
    assert shown.json["nextCursor"] is None


def test_filters_narrow_by_action_identity_token_and_actor(story, operator):
    assert actions(operator("audit", "--action", "identity.paused", "--action", "identity.token_rotated")) == \
        ["identity.token_rotated", "identity.paused"]
    assert actions(operator("audit", "--slug", "first-bot")) == ["identity.paused", "identity.created"]
    first_token = story["first"]["token"]["publicId"]
    assert actions(operator("audit", "--token", first_token)) == ["identity.created"]
    assert actions(operator("audit", "--actor", operator.email.upper())) == actions(operator("audit"))
    assert operator("audit", "--actor", "nobody@example.com").json["events"] == []


def test_a_token_alone_finds_its_workspace(story, operator):
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": operator.email}
    token = story["rotated"]["token"]["publicId"]
    shown = operator.cli("audit", "--token", f"kan_agent_{token}", "--json", env=env)
    assert shown.code == 0, shown.stdout
    assert shown.json["workspacePublicId"] == operator.workspace["publicId"]
    assert actions(shown) == ["identity.token_rotated"]


def test_unknown_identity_token_or_cursor_is_exit_3(story, operator):
    for args, message in ((["--slug", "no-such-bot"], "no agent identity no-such-bot"),
                          (["--token", "Zz99Zz99Zz99"], "no token Zz99Zz99Zz99"),
                          (["--after", "Zz99Zz99Zz99"], "no audit event Zz99Zz99Zz99")):
        shown = operator("audit", *args)
        assert shown.code == 3, (args, shown.stdout)
        assert message in shown.json["error"]["message"]


def test_the_window_is_utc_whatever_the_servers_time_zone(db, operator):
    # An event three hours old, written as UTC like every other (the workspace's first:
    # a later one could not be older than the event before it in the chain). The database
    # stamps every new event's time itself, so it comes as a restore would bring it.
    then = db.execute("SELECT timezone('utc', now()) - interval '3 hours'").fetchone()[0]
    support.restored_event(db, operator.workspace["id"], "Old000000001", "identity.paused", then, "old@example.com")
    operator.create("recent-bot")
    old = db.execute("""SELECT to_char("createdAt", 'YYYY-MM-DD"T"HH24:MI:SS"Z"') FROM agent_audit_event
                        WHERE "publicId" = 'Old000000001'""").fetchone()[0]
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": operator.email}
    w = ["--workspace-public-id", operator.workspace["publicId"], "--json"]
    for zone in ("Pacific/Kiritimati", "America/Los_Angeles", "UTC"):
        zoned = dict(env, PGTZ=zone)

        def ids(*args):
            run = operator.cli("audit", *w, *args, env=zoned)
            assert run.code == 0, (zone, args, run.stdout)
            return {event["publicId"] for event in run.json["events"]}

        assert "Old000000001" not in ids("--since", "2h"), zone
        assert "Old000000001" in ids("--since", "4h"), zone
        assert ids("--until", "2h") == {"Old000000001"}, zone
        # An ISO time: UTC when it says nothing, and its own offset when it says one.
        assert ids("--since", old, "--until", "1h") == {"Old000000001"}, zone
        assert ids("--since", old.replace("Z", "+00:00"), "--until", "1h") == {"Old000000001"}, zone
        assert ids("--since", old.replace("Z", "+01:00"), "--until", "1h") == {"Old000000001"}, zone
        assert ids("--since", old.replace("Z", "-01:00"), "--until", "1h") == set(), zone
        assert ids("--since", old.removesuffix("Z"), "--until", "1h") == {"Old000000001"}, zone


def test_pages_follow_the_cursor_without_gaps_or_repeats(story, operator):
    first = operator("audit", "--limit", "3")
    assert len(first.json["events"]) == 3 and first.json["nextCursor"] == first.json["events"][-1]["publicId"]
    second = operator("audit", "--limit", "3", "--after", first.json["nextCursor"])
    assert second.json["nextCursor"] is None
    assert actions(first) + actions(second) == actions(operator("audit"))
    text = operator.cli("audit", "--workspace-public-id", operator.workspace["publicId"], "--limit", "3", "--wide",
                        env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert text.code == 0
    assert text.stdout.splitlines()[0].split() == ["WHEN", "ACTION", "IDENTITY", "TOKEN", "ACTOR", "REASON"]
    assert "identity.token_rotated" in text.stdout and "investigating" in text.stdout
    assert text.stderr == f"agent-identity: more: add --after {first.json['nextCursor']}\n"


def test_jsonl_all_streams_every_page_one_event_a_line(db, operator):
    for number in range(7):
        operator.create(f"bot-{number}")
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": operator.email}
    w = ["--workspace-public-id", operator.workspace["publicId"]]
    streamed = operator.cli("audit", *w, "--jsonl", "--all", "--limit", "2", env=env)
    assert streamed.code == 0, streamed.stderr
    assert streamed.stderr == ""
    events = [json.loads(line) for line in streamed.stdout.splitlines()]
    stored = [row[0] for row in db.execute(
        """SELECT "publicId" FROM agent_audit_event WHERE "workspaceId" = %s ORDER BY "createdAt" DESC, id DESC""",
        (operator.workspace["id"],))]
    assert [event["publicId"] for event in events] == stored and len(stored) == 7
    assert {event["slug"] for event in events} == {f"bot-{number}" for number in range(7)}
    # Without --all, one page, and the cursor on stderr.
    page = operator.cli("audit", *w, "--jsonl", "--limit", "2", env=env)
    assert len(page.stdout.splitlines()) == 2
    assert page.stderr == f"agent-identity: more: add --after {stored[1]}\n"


def test_a_reader_that_goes_away_ends_the_stream_quietly(cli_dsn, operator):
    for number in range(5):
        operator.create(f"bot-{number}")
    completed = subprocess.run(
        ["bash", "-o", "pipefail", "-c",
         f'"$PYTHON" "$SCRIPT" audit --workspace-public-id {operator.workspace["publicId"]} --jsonl --all '
         '--limit 1 | head -n 1'],
        env=support.cli_env(cli_dsn, AGENT_IDENTITY_ADMIN_EMAIL=operator.email, PYTHON=support.sys.executable,
                            SCRIPT=str(support.SCRIPT)),
        capture_output=True, text=True, timeout=60)
    assert completed.returncode == 141, completed.stderr
    assert completed.stderr == ""
    assert json.loads(completed.stdout)["action"] == "identity.created"


def test_an_outsider_is_refused_sees_nothing_and_is_audited(db, kan, cli, story, operator):
    outsider = kan.user()
    before = support.snapshot(db)
    refused = cli("audit", "--workspace-public-id", operator.workspace["publicId"], "--json",
                  env={"AGENT_IDENTITY_ADMIN_EMAIL": outsider["email"]})
    assert refused.code == 4
    assert refused.json["error"]["kind"] == "forbidden" and "investigating" not in refused.stdout
    [event] = support.added_rows(before, support.snapshot(db))["agent_audit_event"]
    assert (event["action"], event["metadata"]["command"], event["metadata"]["condition"]) == \
        ("access.denied", "audit", "not_an_active_member")
    # ... and the refusal is itself in the log the operator reads.
    assert operator("audit", "--action", "access.denied").json["events"][0]["actorEmail"] == outsider["email"]


@pytest.mark.parametrize("args, message", [
    (["--all"], "--all streams every page, one event per line: give it with --jsonl"),
    (["--json", "--jsonl"], "give --json (one object, one page) or --jsonl"),
    (["--since", "yesterday"], "is neither a duration (24h, 7d) nor an ISO time"),
    (["--action", "identity.deleted"], "is not an audit action"),
    (["--limit", "0"], "must be a whole number from 1 to 1000"),
])
def test_bad_options_are_usage_errors(operator, args, message):
    run = operator.cli("audit", "--workspace-public-id", operator.workspace["publicId"], *args,
                       env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    said = run.stderr + run.stdout  # with --json, the error is JSON on stdout
    assert run.code == 2 and message in said and "Traceback" not in said
    assert len(said.splitlines()) == 1


def test_a_workspace_or_token_is_needed(operator):
    run = operator.cli("audit", env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert run.code == 2
    assert "--workspace-public-id or --workspace (or --token, or --jsonl --all for every workspace)" in run.stderr
