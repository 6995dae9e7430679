"""Tokens a server can rely on: expiry, grace rotation, single-token revoke, verify, token files."""

import os
import stat
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

import agent_identity_admin as tool
from tests import support

TOKEN_SQL = 'SELECT * FROM agent_token WHERE "publicId" = %s'


def token_row(db, public_id):
    from psycopg.rows import dict_row

    return db.cursor(row_factory=dict_row).execute(TOKEN_SQL, (public_id,)).fetchone()


def events(db, operator, slug):
    return db.execute(
        """SELECT e.action, e.metadata FROM agent_audit_event e JOIN agent_identity i ON i.id = e."agentIdentityId"
           WHERE i."workspaceId" = %s AND i.slug = %s ORDER BY e.id""",
        (operator.workspace["id"], slug),
    ).fetchall()


# This module's own database: its tests let time pass for tokens outside the tool.
database, cli_dsn = support.own_database_fixtures()


def expire(db, public_id):
    """Let time pass for one token: its life (a day, made a day and a second ago) is over."""
    support.outside_the_tool(db, """UPDATE agent_token SET "createdAt" = timezone('utc', now()) - interval '1 day 1 second',
                                      "expiresAt" = timezone('utc', now()) - interval '1 second'
                                    WHERE "publicId" = %s""", (public_id,))


def reason(operator, token, *args):
    result = operator.verify(token, *args)
    assert result.code in (0, 7), result.stderr
    assert (result.code == 0) == result.json["valid"]
    return result.json["reason"]


# --- expiry -------------------------------------------------------------------


@pytest.mark.parametrize("text, delta", [("365d", timedelta(days=365)), ("12h", timedelta(hours=12)),
                                         ("30m", timedelta(minutes=30)), ("1w", timedelta(weeks=1))])
def test_expires_in_sets_expires_at(db, operator, text, delta):
    token = operator.create("timed", "--expires-in", text).json["token"]
    row = token_row(db, token["publicId"])
    assert row["expiresAt"] - row["createdAt"] == delta
    assert token["expiresAt"] == tool.iso(row["expiresAt"])


def test_366_days_is_refused_before_anything_is_written(db, operator):
    before = support.snapshot(db)
    result = operator("create", "--slug", "too-long", "--display-name", "X", "--token-name", "t",
                      "--scopes", "boards:read", "--expires-in", "366d", "--confirm")
    assert result.code == 2
    assert result.json["error"]["message"].startswith(
        "argument --expires-in: 366d is longer than the limit of 365 days")
    assert support.snapshot(db) == before


def test_never_is_recorded(db, operator):
    token = operator.create("forever", "--expires-in", "never").json["token"]
    assert token["expiresAt"] is None
    assert token_row(db, token["publicId"])["expiresAt"] is None
    [(action, metadata)] = events(db, operator, "forever")
    assert (metadata["expiresIn"], metadata["expiresAt"]) == ("never", None)


def test_rotate_takes_its_own_expiry(db, operator):
    operator.create("re-timed", "--expires-in", "never")
    token = operator("rotate", "--slug", "re-timed", "--expires-in", "30d", "--confirm").json["token"]
    row = token_row(db, token["publicId"])
    assert row["expiresAt"] - row["createdAt"] == timedelta(days=30)
    assert events(db, operator, "re-timed")[-1][1]["expiresIn"] == "30d"


def test_a_token_expiring_within_a_week_is_warned_about(operator):
    soon = operator.create("soon", "--expires-in", "3d").json["token"]
    operator.create("later", "--expires-in", "8d")

    inspected = operator("inspect", "--slug", "soon")
    assert inspected.json["identity"]["tokens"][0]["expiringSoon"] is True
    assert inspected.stderr.startswith(
        f"agent-identity: warning: token {soon['publicId']} of agent identity soon expires in 3 days (")
    later = operator("inspect", "--slug", "later")
    assert later.json["identity"]["tokens"][0]["expiringSoon"] is False
    assert later.stderr == ""

    listed = operator("list")
    assert {i["slug"]: i["expiringSoon"] for i in listed.json["identities"]} == {"soon": True, "later": False}
    assert listed.stderr.splitlines() == [
        f"agent-identity: warning: agent identity soon has a live token that expires in 3 days "
        f"({listed.json['identities'][1]['nextExpiresAt']})"
    ]
    human = operator("inspect", "--slug", "soon", json=False)
    assert "in 3 days" in human.stdout and "warning: token" in human.stderr


# --- rotation with a grace window -----------------------------------------------


def test_grace_rotation_keeps_the_old_token_working_until_the_grace_ends(db, operator):
    old = operator.create("graceful").json["token"]
    result = operator("rotate", "--slug", "graceful", "--grace", "1h", "--confirm")
    assert result.code == 0, result.stderr
    new = result.json["token"]

    old_row, new_row = token_row(db, old["publicId"]), token_row(db, new["publicId"])
    assert old_row["revokedAt"] is None
    assert old_row["expiresAt"] == new_row["createdAt"] + timedelta(hours=1)
    assert result.json["revokedTokenPublicIds"] == []
    assert result.json["gracedTokens"] == [{"publicId": old["publicId"], "expiresAt": tool.iso(old_row["expiresAt"])}]
    metadata = events(db, operator, "graceful")[-1][1]
    assert metadata["grace"] == "1h"
    assert metadata["gracedTokens"] == result.json["gracedTokens"]

    assert reason(operator, old["secret"]) is None
    assert reason(operator, new["secret"]) is None
    expire(db, old["publicId"])
    assert reason(operator, old["secret"]) == "token_expired"
    assert reason(operator, new["secret"]) is None


def test_grace_never_lengthens_a_token(db, operator):
    old = operator.create("short-lived", "--expires-in", "30m").json["token"]
    before = token_row(db, old["publicId"])["expiresAt"]
    operator("rotate", "--slug", "short-lived", "--grace", "2h", "--confirm")
    assert token_row(db, old["publicId"])["expiresAt"] == before


def test_two_grace_rotations_leave_exactly_three_valid_tokens(db, operator):
    first = operator.create("stacked").json["token"]
    second = operator("rotate", "--slug", "stacked", "--grace", "2h", "--confirm").json["token"]
    third = operator("rotate", "--slug", "stacked", "--grace", "1h", "--confirm").json["token"]
    assert [reason(operator, t["secret"]) for t in (first, second, third)] == [None, None, None]
    assert token_row(db, first["publicId"])["expiresAt"] == token_row(db, second["publicId"])["expiresAt"]
    # A rotation without grace then retires them all at once.
    fourth = operator("rotate", "--slug", "stacked", "--confirm").json["token"]
    assert [reason(operator, t["secret"]) for t in (first, second, third, fourth)] == [
        "token_revoked", "token_revoked", "token_revoked", None]


def test_grace_over_seven_days_is_refused(operator):
    operator.create("impatient")
    result = operator("rotate", "--slug", "impatient", "--grace", "8d", "--confirm")
    assert result.code == 2
    assert "argument --grace: 8d is longer than the limit of 7 days" in result.json["error"]["message"]


# --- revoking one token -------------------------------------------------------


def test_revoking_one_token_leaves_the_identity_and_other_tokens(db, operator):
    old = operator.create("switcher").json["token"]
    new = operator("rotate", "--slug", "switcher", "--grace", "1d", "--confirm").json["token"]
    result = operator("revoke", "--slug", "switcher", "--token", old["publicId"], "--reason", "switched", "--confirm")
    assert result.code == 0, result.stderr
    assert (result.json["changed"], result.json["revokedTokenPublicIds"]) == (True, [old["publicId"]])
    assert result.json["identity"]["status"] == "active"
    assert reason(operator, old["secret"]) == "token_revoked"
    assert reason(operator, new["secret"]) is None
    action, metadata = events(db, operator, "switcher")[-1]
    assert action == "identity.token_revoked"
    assert metadata["revokedTokenPublicIds"] == [old["publicId"]]

    before = support.snapshot(db)
    again = operator("revoke", "--slug", "switcher", "--token", old["publicId"], "--confirm")
    assert (again.code, again.json["changed"]) == (0, False)
    assert support.snapshot(db) == before


def test_revoking_a_token_of_another_identity_is_not_found(db, operator):
    other = operator.create("other-one").json["token"]
    operator.create("this-one")
    before = support.snapshot(db)
    result = operator("revoke", "--slug", "this-one", "--token", other["publicId"], "--confirm")
    assert result.code == 3
    assert result.json["error"]["message"] == f"agent identity this-one has no token {other['publicId']}"
    assert support.snapshot(db) == before


def test_revoking_one_token_as_a_dry_run_writes_nothing(db, operator):
    token = operator.create("dry-token").json["token"]
    before = support.snapshot(db)
    result = operator("revoke", "--slug", "dry-token", "--token", token["publicId"], "--dry-run", json=False)
    assert result.code == 0
    assert result.stdout.splitlines()[:2] == [
        f"would revoke a token of agent identity dry-token ({token and result.stdout.split('(')[1].split(')')[0]}) "
        f"\"Agent dry-token\" in workspace {operator.workspace['publicId']}: active",
        f"would revoke token {token['publicId']}",
    ]
    assert support.snapshot(db) == before


# --- verify -------------------------------------------------------------------


def test_a_valid_token_verifies_with_its_identity_and_scopes(db, operator):
    token = operator.create("checked", scopes="cards:read,cards:write").json["token"]
    before = support.snapshot(db)
    result = operator.verify(token["secret"])
    assert result.code == 0
    assert result.json == {
        "ok": True, "command": "verify", "valid": True, "reason": None,
        "identity": result.json["identity"],
        "token": {"publicId": token["publicId"], "scopes": ["cards:read", "cards:write"],
                  "expiresAt": token["expiresAt"]},
    }
    assert result.json["identity"]["slug"] == "checked"
    assert support.snapshot(db) == before, "verify writes nothing, lastUsedAt included"


def test_verify_reasons_from_the_token_alone_need_no_database(operator):
    """Malformed and bad-checksum tokens are refused with an unreachable database and no actor."""
    token = tool.new_token(tool.new_public_id())
    mistyped = token[:-7] + ("A" if token[-7] != "A" else "B") + token[-6:]
    for text, expected in ((token[:-1], "malformed"), ("Bearer " + token, "malformed"),
                           ("x" * 100_000, "malformed"), (mistyped, "bad_checksum")):
        result = support.run_cli(["verify", "--json"], "postgresql://u:pw@127.0.0.1:9/x", input=text)
        assert (result.code, result.json["reason"], result.json["token"]) == (7, expected, None)


def test_each_reason_a_server_refuses_for(db, kan, cli, operator):
    unknown = tool.new_token(tool.new_public_id())
    assert reason(operator, unknown) == "unknown_token"

    good = operator.create("reasons").json["token"]
    body = f"kan_agent_{good['publicId']}_" + "A" * 43
    assert reason(operator, body + tool.token_checksum(body)) == "hash_mismatch"

    rotated = operator("rotate", "--slug", "reasons", "--confirm").json["token"]
    assert reason(operator, good["secret"]) == "token_revoked"

    operator("pause", "--slug", "reasons", "--confirm")
    assert reason(operator, rotated["secret"]) == "identity_paused"
    operator("resume", "--slug", "reasons", "--confirm")
    assert reason(operator, rotated["secret"]) is None

    expire(db, rotated["publicId"])
    assert reason(operator, rotated["secret"]) == "token_expired"

    other = operator.create("reasons-2").json["token"]
    # Revoking an identity revokes its tokens; a server must refuse even if a token row was missed.
    support.outside_the_tool(db, "UPDATE agent_identity SET status = 'revoked' WHERE \"workspaceId\" = %s "
                                 "AND slug = 'reasons-2'", (operator.workspace["id"],))
    assert reason(operator, other["secret"]) == "identity_revoked"

    last = operator.create("reasons-3").json["token"]
    db.execute('UPDATE workspace SET "deletedAt" = now() WHERE id = %s', (operator.workspace["id"],))
    try:
        assert reason(operator, last["secret"]) == "workspace_deleted"
    finally:
        db.execute('UPDATE workspace SET "deletedAt" = NULL WHERE id = %s', (operator.workspace["id"],))


def unknown_token() -> str:
    """A well-formed token (valid checksum) whose public id exists nowhere."""
    return tool.new_token(tool.new_public_id())


@pytest.mark.skipif(support.PROVEN, reason=support.NAMES_WHAT_IT_AIMED_AT)
@pytest.mark.parametrize("who", ["manager elsewhere", "no Kan user"])
def test_verify_tells_an_outsider_nothing_not_even_that_the_token_exists(kan, cli, db, operator, who):
    """A token of a workspace the actor may not manage gets exactly the answer an unknown id
    gets; the probe is audited in the token's workspace."""
    token = operator.create("private").json["token"]
    outsider = kan.managed_workspace()[1]["email"] if who == "manager elsewhere" else "nobody@example.com"
    before = support.snapshot(db)
    for as_json in (True, False):
        real = cli("verify", *(["--json"] if as_json else []), env={"AGENT_IDENTITY_ADMIN_EMAIL": outsider},
                   input=token["secret"])
        unknown = cli("verify", *(["--json"] if as_json else []), env={"AGENT_IDENTITY_ADMIN_EMAIL": outsider},
                      input=unknown_token())
        assert (real.code, real.stdout, real.stderr) == (unknown.code, unknown.stdout, unknown.stderr)
        assert real.code == 7
    assert real.stdout == "not valid: unknown_token\n"
    events = support.added_rows(before, support.snapshot(db))["agent_audit_event"]
    assert [(e["action"], e["workspaceId"], e["agentTokenId"] is not None) for e in events] == \
        [("access.denied", operator.workspace["id"], True)] * 2
    assert events[0]["metadata"]["tokenPublicId"] == token["publicId"]
    assert events[0]["metadata"]["command"] == "verify"


def test_verify_within_ones_own_workspace_does_not_find_anothers_token(kan, cli, operator):
    token = operator.create("private").json["token"]
    outsider_workspace, outsider = kan.managed_workspace()
    scoped = cli("verify", "--json", "--workspace-public-id", outsider_workspace["publicId"],
                 env={"AGENT_IDENTITY_ADMIN_EMAIL": outsider["email"]}, input=token["secret"])
    assert (scoped.code, scoped.json["reason"], scoped.json["identity"]) == (7, "unknown_token", None)


def test_verify_within_the_tokens_own_workspace(operator):
    token = operator.create("scoped").json["token"]
    assert reason(operator, token["secret"], "--workspace-public-id", operator.workspace["publicId"]) is None


def test_verify_reads_a_token_file(tmp_path, operator):
    path = tmp_path / "agent.token"
    operator.create("from-file", "--token-file", str(path))
    result = operator.cli("verify", "--token-file", str(path), env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert result.code == 0
    assert result.stdout.startswith("valid\n")


def test_verify_without_a_token_is_a_usage_error(operator):
    result = operator.cli("verify", env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email}, input="\n")
    assert result.code == 2
    assert result.stderr == (
        "agent-identity: error: no token given: pipe it to standard input, or use --token-file PATH\n")


def test_verify_takes_no_token_on_the_command_line(operator):
    token = operator.create("argv").json["token"]["secret"]
    result = operator.cli("verify", token, env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert result.code == 2
    assert result.stderr == (
        "agent-identity: error: unrecognized arguments: kan_agent_*** (see `agent-identity --help`) "
        "(a token on the command line lands in shell history and the process list: rotate it)\n"
    )


def test_a_token_never_appears_in_the_process_arguments(cli_dsn, operator):
    """While verify waits for its token on stdin, /proc/<pid>/cmdline holds no secret."""
    token = operator.create("proc").json["token"]["secret"]
    process = support.start_cli(["verify", "--json"], cli_dsn, {"AGENT_IDENTITY_ADMIN_EMAIL": operator.email},
                                stdin=subprocess.PIPE)
    try:
        time.sleep(0.3)
        cmdline = open(f"/proc/{process.pid}/cmdline", "rb").read().decode()
        environ = open(f"/proc/{process.pid}/environ", "rb").read().decode(errors="replace")
        stdout, _ = process.communicate(token + "\n", timeout=30)
    finally:
        process.kill()
    assert "verify" in cmdline
    assert token not in cmdline and token not in environ
    assert '"valid": true' in stdout


# --- token files --------------------------------------------------------------


def test_token_file_is_new_private_and_keeps_the_secret_off_stdout(db, tmp_path, operator):
    path = tmp_path / "bot.token"
    result = operator.create("filed", "--token-file", str(path))
    token = path.read_text()
    assert token.endswith("\n") and tool.parse_token(token.strip())[1] is None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "secret" not in result.json["token"]
    assert result.json["token"]["tokenFile"] == str(path)
    assert "kan_agent_" not in result.stdout + result.stderr
    human_path = tmp_path / "bot2.token"
    human = operator("rotate", "--slug", "filed", "--token-file", str(human_path), "--confirm", json=False)
    assert f'token: written to "{human_path}" (mode 0600)' in human.stdout
    assert "kan_agent_" not in human.stdout + human.stderr
    text = support.database_text(db)
    assert token.strip() not in text and human_path.read_text().strip() not in text


def test_an_existing_token_file_is_never_overwritten(db, tmp_path, operator):
    path = tmp_path / "taken.token"
    path.write_text("precious\n")
    link = tmp_path / "link.token"
    link.symlink_to(tmp_path / "nowhere")
    before = support.snapshot(db)
    for target in (path, link):
        for mode in ("--confirm", "--dry-run"):
            result = operator("create", "--slug", "clobber", "--display-name", "X", "--token-name", "t",
                              "--scopes", "boards:read", "--token-file", str(target), mode)
            assert result.code == 5, result.stdout
            assert result.json["error"]["message"] == (
                f'token file "{target}" exists; a token file is never overwritten')
    assert path.read_text() == "precious\n"
    assert not (tmp_path / "nowhere").exists()
    assert support.snapshot(db) == before


def test_a_failed_command_leaves_no_token_file(tmp_path, operator):
    operator.create("existing")
    path = tmp_path / "unused.token"
    result = operator("create", "--slug", "existing", "--display-name", "X", "--token-name", "t",
                      "--scopes", "boards:read", "--token-file", str(path), "--confirm")
    assert result.code == 5
    assert not path.exists()
    dry = operator("rotate", "--slug", "existing", "--token-file", str(path), "--dry-run")
    assert dry.code == 0 and not path.exists()


def test_a_token_file_in_a_missing_folder_is_a_usage_error(db, tmp_path, operator):
    before = support.snapshot(db)
    result = operator("create", "--slug", "nowhere", "--display-name", "X", "--token-name", "t",
                      "--scopes", "boards:read", "--token-file", str(tmp_path / "no" / "such.token"), "--confirm")
    assert result.code == 2
    assert "cannot create token file" in result.json["error"]["message"]
    assert support.snapshot(db) == before


# --- rotation keeps what it had, unless told ---------------------------------------


@pytest.mark.parametrize("lifetime, days", [("3d", 3), ("12h", 0.5), ("never", None)])
def test_rotation_keeps_the_lifetime_the_rotated_token_was_issued_with(operator, lifetime, days):
    operator.create(f"kept-{len(lifetime)}", "--expires-in", lifetime)
    rotated = operator("rotate", "--slug", f"kept-{len(lifetime)}", "--confirm")
    token, now = rotated.json["token"], datetime.now(timezone.utc).replace(tzinfo=None)
    assert (token["expiresIn"], token["lifetimeKept"]) == (lifetime, True)
    assert rotated.json["auditEvent"]["metadata"]["lifetimeKeptFromRotatedToken"] is True
    if days is None:
        assert token["expiresAt"] is None
    else:
        left = tool.from_iso(token["expiresAt"]) - now
        assert abs(left.total_seconds() - days * 86400) < 120, left
    human = operator("rotate", "--slug", f"kept-{len(lifetime)}", "--dry-run", json=False)
    assert f"lifetime {lifetime} (the rotated token's)" in human.stdout
    assert ("never expires, as the rotated one was issued with --expires-in never" in human.stderr) == (days is None)


def test_a_lifetime_given_to_rotate_wins(operator):
    operator.create("told", "--expires-in", "3d")
    token = operator("rotate", "--slug", "told", "--expires-in", "30d", "--confirm").json["token"]
    assert (token["expiresIn"], token["lifetimeKept"]) == ("30d", False)


def test_a_token_from_before_lifetimes_were_recorded_keeps_its_span(db, operator):
    """No issuing event to read (a token older than the audit log): expiry less creation, in days."""
    created = operator.create("old-span", "--expires-in", "10d").json["token"]
    # Its issuing event as version 0.2 wrote it, with no expiresIn.
    support.outside_the_tool(db, """UPDATE agent_audit_event SET metadata = metadata - 'expiresIn'
                                    WHERE "tokenPublicId" = %s""", (created["publicId"],))
    assert operator("rotate", "--slug", "old-span", "--confirm").json["token"]["expiresIn"] == "10d"


def test_that_span_is_from_the_tokens_creation_not_from_now(db, operator):
    """A token from before lifetimes were recorded, made 5 days ago to live 10: its span is
    10 days (expiry less creation), not the 5 it has left."""
    created = operator.create("aged-span", "--expires-in", "10d").json["token"]
    support.outside_the_tool(db, """UPDATE agent_token SET "createdAt" = "createdAt" - interval '5 days',
                                                          "expiresAt" = "expiresAt" - interval '5 days'
                                    WHERE "publicId" = %s""", (created["publicId"],))
    support.outside_the_tool(db, """UPDATE agent_audit_event SET metadata = metadata - 'expiresIn'
                                    WHERE "tokenPublicId" = %s""", (created["publicId"],))
    assert operator("rotate", "--slug", "aged-span", "--confirm").json["token"]["expiresIn"] == "10d"


def test_rotate_with_scopes_issues_them_and_audits_old_and_new(db, operator):
    operator.create("rescoped", scopes="boards:read")
    result = operator("rotate", "--slug", "rescoped", "--scopes", "cards:read,cards:write", "--confirm")
    assert result.json["token"]["scopes"] == ["cards:read", "cards:write"]
    metadata = result.json["auditEvent"]["metadata"]
    assert (metadata["previousScopes"], metadata["scopes"]) == (["boards:read"], ["cards:read", "cards:write"])
    stored = db.execute('SELECT scopes FROM agent_token WHERE "publicId" = %s',
                        (result.json["token"]["publicId"],)).fetchone()[0]
    assert stored == ["cards:read", "cards:write"]
    refused = operator("rotate", "--slug", "rescoped", "--scopes", "cards:wirte", "--confirm")
    assert refused.code == 2 and "did you mean cards:write?" in refused.json["error"]["message"]
