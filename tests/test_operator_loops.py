"""The loops an operator walks close: an incident's pause is undone exactly, expiry warns
about what is meant to end no more than it must and about agents already down, a token
piped to a secret manager never lands on a screen or as nothing, and a usage error names
what is missing."""

import os
import pty
import subprocess
import sys

import pytest

from tests import support


def test_resume_batch_resumes_exactly_what_the_batch_paused(operator):
    for slug in ("before", "batched-1", "batched-2", "batched-3"):
        operator.create(slug)
    operator("pause", "--slug", "before", "--reason", "its own reason", "--confirm")
    preview = operator("pause", "--all", "--reason", "incident", "--dry-run").json
    assert preview["batchId"] is None and preview["auditEvent"]["metadata"]["batchId"] is None
    batch = operator("pause", "--all", "--reason", "incident", "--confirm").json["batchId"]
    operator("resume", "--slug", "batched-2", "--confirm")
    operator("pause", "--slug", "batched-2", "--reason", "paused again, for itself", "--confirm")
    operator("resume", "--slug", "batched-3", "--confirm")
    dry = operator("resume", "--batch", batch, "--dry-run").json
    assert [i["slug"] for i in dry["identities"]] == ["batched-1"]
    done = operator("resume", "--batch", batch, "--reason", "incident over", "--confirm").json
    assert ([i["slug"] for i in done["identities"]], done["auditEvent"]["metadata"]["undoesBatchId"]) == (
        ["batched-1"], batch)
    statuses = {i["slug"]: i["status"] for i in operator("list").json["identities"]}
    assert statuses == {"before": "paused", "batched-1": "active", "batched-2": "paused", "batched-3": "active"}
    [event] = operator("audit", "--slug", "batched-1", "--action", "identity.resumed").json["events"]
    assert (event["metadata"]["undoesBatchId"], event["reason"]) == (batch, "incident over")
    again = operator("resume", "--batch", batch, "--confirm", json=False)
    assert again.code == 0 and "nothing to change" in again.stdout
    unknown = operator("resume", "--batch", "Zz99Zz99Zz99", "--confirm", json=False)
    assert unknown.code == 3 and f"no pause --all batch Zz99Zz99Zz99 in workspace {operator.workspace['publicId']}" \
        in unknown.stderr


def test_a_superseded_token_in_its_grace_is_no_alarm_unless_asked(operator):
    operator.create("graced")
    operator("rotate", "--slug", "graced", "--grace", "2d", "--confirm")
    run = operator.cli("expiring", env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert run.code == 0, run.stdout
    asked = operator.cli("expiring", "--include-superseded", "--json", env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert asked.code == 9
    [token] = asked.json["tokens"]
    assert (token["slug"], token["superseded"]) == ("graced", True)


def test_an_active_identity_with_no_live_token_is_down_everywhere(operator):
    token = operator.create("stranded").json["token"]["publicId"]
    operator.create("fine")
    operator("revoke", "--slug", "stranded", "--token", token, "--confirm")
    run = operator.cli("expiring", "--json", env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert run.code == 9
    assert ([d["slug"] for d in run.json["down"]], run.json["tokens"]) == (["stranded"], [])
    text = operator.cli("expiring", env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email})
    assert "down: " in text.stdout and "stranded is active with no live token (every token was revoked)" in text.stdout
    listed = {i["slug"]: i["down"] for i in operator("list").json["identities"]}
    assert listed == {"stranded": True, "fine": False}
    assert "stranded is active with no live token" in operator("list", json=False).stderr
    assert "active (down)" in operator("list", json=False).stdout
    inspected = operator("inspect", "--slug", "stranded")
    assert inspected.json["identity"]["down"] is True
    assert "status     active (down: no live token)" in operator("inspect", "--slug", "stranded", json=False).stdout


def test_a_token_for_a_pipe_is_refused_with_a_preview(operator):
    before = operator("list").json["identities"]
    run = operator("create", "--slug", "previewed", "--display-name", "P", "--token-name", "t", "--scopes",
                   "boards:read", "--token-file", "-", "--dry-run", json=False)
    assert (run.code, run.stdout) == (2, "")
    assert "--token-file - with --dry-run would pipe nothing" in run.stderr
    assert operator("list").json["identities"] == before


def test_a_token_for_a_pipe_is_never_printed_on_a_terminal(cli_dsn, operator):
    """stdout a terminal (a pty): refused, exit 2, and no token was made."""
    leader, follower = pty.openpty()
    env = support.cli_env(cli_dsn, AGENT_IDENTITY_ADMIN_EMAIL=operator.email)
    process = subprocess.run(
        [sys.executable, "-m", "agent_identity_admin", "create", "--workspace-public-id",
         operator.workspace["publicId"], "--slug", "on-screen", "--display-name", "S", "--token-name", "t",
         "--scopes", "boards:read", "--token-file", "-", "--confirm"],
        stdout=follower, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=support.REPO, timeout=60)
    os.close(follower)
    shown = os.read(leader, 65536) if process.returncode != 2 else b""
    os.close(leader)
    assert process.returncode == 2, shown
    assert b"would print the token on this terminal" in process.stderr
    assert operator("list").json["identities"] == []


@pytest.mark.parametrize("args, missing", [
    (["pause", "--slug", "x", "--confirm"], "required: --workspace-public-id or --workspace (see"),
    (["pause", "--all", "--confirm"], "required: --workspace-public-id or --workspace (see"),
    (["resume", "--batch", "Bt12Bt34Bt56", "--confirm"], "required: --workspace-public-id or --workspace (see"),
    (["revoke", "--all", "--confirm"], "required: --workspace-public-id or --workspace (or --token) (see"),
])
def test_a_usage_error_names_what_is_missing(cli, args, missing):
    run = cli(*args, env={"AGENT_IDENTITY_ADMIN_EMAIL": "a@example.com"})
    assert run.code == 2 and missing in run.stderr, run.stderr


def test_a_usage_error_names_the_identity_choice(operator):
    run = operator("resume", "--confirm", json=False)
    assert run.code == 2 and "required: --slug or --all or --batch (see" in run.stderr


@pytest.mark.parametrize("command", [["inspect"], ["pause", "--confirm"], ["audit"]])
def test_an_unknown_slug_gets_the_nearest(operator, command):
    operator.create("release-bot")
    run = operator(command[0], "--slug", "relase-bot", *command[1:], json=False)
    assert run.code == 3
    assert run.stderr.endswith(f"no agent identity relase-bot in workspace {operator.workspace['publicId']} "
                               "(did you mean release-bot?)\n")


def test_an_interrupt_after_the_commit_says_it_was_committed(cli_dsn, operator, monkeypatch, tmp_path):
    """Ctrl-C between the commit and the result on screen: never "rolled back"."""
    import io
    from unittest import mock

    import agent_identity_admin as tool

    monkeypatch.setenv("DATABASE_URL", cli_dsn)
    monkeypatch.setenv("AGENT_IDENTITY_ADMIN_EMAIL", operator.email)
    err = io.StringIO()
    with mock.patch.object(tool, "exit_code", side_effect=KeyboardInterrupt):
        code = tool.main(["create", "--workspace-public-id", operator.workspace["publicId"], "--slug", "late",
                          "--display-name", "L", "--token-name", "t", "--scopes", "boards:read", "--token-file",
                          str(tmp_path / "late.token"), "--confirm"], io.StringIO(), err)
    assert code == 130
    assert "the create was committed, but it was interrupted before its result was shown" in err.getvalue()
    assert [i["slug"] for i in operator("list").json["identities"]] == ["late"]


@pytest.mark.parametrize("limit", ["-1", "0", "1"])
def test_any_connect_limit_libpq_takes_works(operator, cli_dsn, limit):
    run = operator.cli("list", "--workspace-public-id", operator.workspace["publicId"],
                       env={"AGENT_IDENTITY_ADMIN_EMAIL": operator.email},
                       dsn=support.make_conninfo(cli_dsn, connect_timeout=limit))
    assert run.code == 0, run.stderr
