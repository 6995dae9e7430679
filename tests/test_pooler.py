"""Through a real PgBouncer (Debian's package), in transaction and in session mode: the
tool connects, its limits hold inside each of its transactions and nowhere else, and
every command gives what it gives on a direct connection.

Skipped where pgbouncer is not installed, unless AGENT_IDENTITY_REQUIRE_PGBOUNCER is
set (.ci/run sets it and installs the package).
"""

import io
import signal
import time
from unittest import mock

import psycopg
import pytest

import agent_identity_admin as tool
from tests import scenarios, support


@pytest.fixture(scope="module", params=["transaction", "session"])
def pooled(request, cli_dsn):
    """The DSN of the CLI's role, through a PgBouncer in this pool mode."""
    with support.pgbouncer(cli_dsn, request.param) as dsn:
        yield dsn


def as_operator(kan):
    workspace, admin = kan.managed_workspace()
    return workspace, admin["email"]


# The commands the lifecycle runs (tests/test_meta.py holds every database command to it).
COVERED = ("doctor", "create", "inspect", "list", "rotate", "verify", "pause", "resume", "revoke", "workspaces",
           "expiring", "audit", "review")


def lifecycle(dsn: str, workspace: dict, email: str) -> list[tuple]:
    """Every command, the way an operator runs them; what each said, less ids and times."""
    w = ["--workspace-public-id", workspace["publicId"]]
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": email}

    def run(*args, input=None):
        return support.run_cli([*args, "--json"], dsn, env, input=input)

    def summary(name, result):
        body = result.json
        return (name, result.code, body.get("ok"), body.get("changed"), body.get("reason"),
                (body.get("identity") or {}).get("status"), (body.get("error") or {}).get("kind"))

    steps = [summary("doctor", run("doctor", *w))]
    create = ["create", *w, "--slug", "pooled", "--display-name", "Pooled", "--token-name", "t",
              "--scopes", "boards:read"]
    steps.append(summary("create dry run", run(*create, "--dry-run")))
    created = run(*create, "--confirm")
    steps.append(summary("create", created))
    first = created.json["token"]["secret"]
    inspected = run("inspect", *w, "--slug", "pooled")
    steps.append(summary("inspect", inspected) + (len(inspected.json["identity"]["tokens"]),
                                                  len(inspected.json["identity"]["events"])))
    listed = run("list", *w)
    steps.append(summary("list", listed) + (len(listed.json["identities"]),))
    rotated = run("rotate", *w, "--slug", "pooled", "--grace", "1h", "--confirm")
    steps.append(summary("rotate --grace", rotated))
    second = rotated.json["token"]["secret"]
    steps.append(summary("verify new", run("verify", input=second)))
    steps.append(summary("verify graced", run("verify", *w, input=first)))
    for command in ("pause", "resume", "revoke"):
        steps.append(summary(f"{command} dry run", run(command, *w, "--slug", "pooled", "--dry-run")))
        steps.append(summary(command, run(command, *w, "--slug", "pooled", "--confirm")))
        steps.append(summary(f"verify after {command}", run("verify", input=second)))
    steps.append(summary("workspaces", run("workspaces")))
    steps.append(summary("expiring", run("expiring", *w, "--within", "2h")))
    reviewed = run("review", *w)
    steps.append(summary("review", reviewed) + ([row["findings"] for row in reviewed.json["identities"]],))
    audited = run("audit", *w)
    steps.append(summary("audit", audited) + (len(audited.json["events"]),))
    chain = run("audit", "verify", *w)
    steps.append(summary("audit verify", chain) + (chain.json["intact"], chain.json["workspaces"][0]["events"]))
    streamed = support.run_cli(["audit", *w, "--jsonl", "--all", "--limit", "2"], dsn, env)
    steps.append(("audit --jsonl --all", streamed.code, len(streamed.stdout.splitlines())))
    steps.append(summary("create again", run(*create, "--confirm")))
    steps.append(summary("inspect missing", run("inspect", *w, "--slug", "absent")))
    return steps


def audit_trail(db, workspace: dict) -> list[tuple]:
    return db.execute(
        """SELECT e.action, e.metadata->>'previousStatus', e.metadata->>'newStatus', i.status::text
           FROM agent_audit_event e LEFT JOIN agent_identity i ON i.id = e."agentIdentityId"
           WHERE e."workspaceId" = %s ORDER BY e.id""", (workspace["id"],)).fetchall()


def test_the_whole_lifecycle_gives_what_it_gives_direct(pooled, cli_dsn, db, kan):
    direct_workspace, direct_email = as_operator(kan)
    pooled_workspace, pooled_email = as_operator(kan)
    direct = lifecycle(cli_dsn, direct_workspace, direct_email)
    through = lifecycle(pooled, pooled_workspace, pooled_email)
    assert through == direct
    assert [code for _, code, *_ in direct] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0,
                                                0, 5, 3]
    assert ("audit verify", 0, True, None, None, None, None, True, 5) in through
    assert audit_trail(db, pooled_workspace) == audit_trail(db, direct_workspace)
    assert len(audit_trail(db, pooled_workspace)) == 5


def test_a_held_lock_ends_in_exit_5_after_the_lock_timeout(pooled, database, kan):
    workspace, email = as_operator(kan)
    support.run_cli(["create", "--workspace-public-id", workspace["publicId"], "--slug", "held", "--display-name",
                     "H", "--token-name", "t", "--scopes", "boards:read", "--confirm"], pooled,
                    {"AGENT_IDENTITY_ADMIN_EMAIL": email})
    with psycopg.connect(database) as holder, psycopg.connect(database, autocommit=True) as watcher:
        holder.execute('SELECT id FROM agent_identity WHERE "workspaceId" = %s AND slug = %s FOR UPDATE',
                       (workspace["id"], "held"))
        process = support.start_cli(["pause", "--workspace-public-id", workspace["publicId"], "--slug", "held",
                                     "--lock-timeout", "1", "--confirm"], pooled, {"AGENT_IDENTITY_ADMIN_EMAIL": email})
        _, stderr, elapsed = support.waited(watcher, process)
    assert process.returncode == 5, stderr
    assert "waited 1 s for its lock" in stderr
    assert 0.8 <= elapsed < 3, elapsed


LIMITS = ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout", "TimeZone")


def settings(conn) -> dict:
    return {name: conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0] for name in LIMITS}


@pytest.mark.parametrize("argv", [
    ["pause", "--slug", "shown", "--lock-timeout", "2.5", "--confirm"],
    ["inspect", "--slug", "shown", "--lock-timeout", "2.5"],
])
def test_the_limits_hold_inside_the_tools_transactions_and_only_there(pooled, kan, argv, monkeypatch):
    """What the server says inside the tool's own transaction, on its own connection."""
    workspace, email = as_operator(kan)
    support.run_cli(["create", "--workspace-public-id", workspace["publicId"], "--slug", "shown", "--display-name",
                     "S", "--token-name", "t", "--scopes", "boards:read", "--confirm"], pooled,
                    {"AGENT_IDENTITY_ADMIN_EMAIL": email})
    seen = []
    real_check_access = tool.check_access

    def showing(conn, *args, **kwargs):
        seen.append(settings(conn))
        return real_check_access(conn, *args, **kwargs)

    monkeypatch.setenv("DATABASE_URL", pooled)
    monkeypatch.setenv("AGENT_IDENTITY_ADMIN_EMAIL", email)
    with mock.patch.object(tool, "check_access", showing):
        code = tool.main([argv[0], "--workspace-public-id", workspace["publicId"], *argv[1:]],
                         io.StringIO(), io.StringIO())
    assert code == 0
    assert seen == [{"lock_timeout": "2500ms", "statement_timeout": "32500ms",
                     "idle_in_transaction_session_timeout": "1min", "TimeZone": "UTC"}]
    # The next client of the pool gets a server connection with none of them.
    with psycopg.connect(pooled, autocommit=True) as after:
        assert settings(after)["lock_timeout"] == "0"


def test_eight_concurrent_rotations_leave_one_live_token(pooled, kan):
    workspace, email = as_operator(kan)
    support.run_cli(["create", "--workspace-public-id", workspace["publicId"], "--slug", "spun", "--display-name",
                     "S", "--token-name", "t", "--scopes", "boards:read", "--confirm"], pooled,
                    {"AGENT_IDENTITY_ADMIN_EMAIL": email})
    figures = scenarios.concurrent_rotations(pooled, workspace, email, "spun", runs=8)
    assert (figures.tracebacks, figures.undocumented_exits, figures.lost_writes, figures.problems) == (0, 0, 0, [])
    assert figures.successes == 8, figures.exit_codes


def test_doctor_through_the_pooler_names_it_and_checks_the_limits(pooled):
    result = support.run_cli(["doctor", "--json"], pooled)
    assert result.code == 0, result.stdout
    checks = {c["name"]: c for c in result.json["checks"]}
    port = psycopg.conninfo.conninfo_to_dict(pooled)["port"]
    assert f"at 127.0.0.1:{port} as role" in checks["connection"]["detail"]
    assert checks["session limits"]["ok"]


@pytest.fixture
def saturated(cli_dsn):
    """A PgBouncer whose one server connection another client holds in a transaction:
    every other client waits in its queue, where neither connect_timeout nor a cancel
    reaches."""
    with support.pgbouncer(cli_dsn, "transaction", pool_size=1) as dsn:
        with psycopg.connect(dsn) as holder:
            holder.execute("SELECT 1")  # in its transaction: the pool's one server is its own
            yield dsn


def test_a_full_pooler_queue_ends_at_the_connect_limit(saturated, kan):
    workspace, email = as_operator(kan)
    started = time.monotonic()
    # In the connection string, which wins over PGCONNECT_TIMEOUT (a test DSN may carry its own).
    run = support.run_cli(["list", "--workspace-public-id", workspace["publicId"]],
                          support.make_conninfo(saturated, connect_timeout=2), {"AGENT_IDENTITY_ADMIN_EMAIL": email})
    elapsed = time.monotonic() - started
    assert run.code == 6, run.stderr
    assert "did not begin a transaction within 2 s (the connect limit): a connection pooler's queue is full" \
        in run.stderr
    assert elapsed < 5, elapsed


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_acts_within_a_second_in_a_pooler_queue(saturated, kan, signum):
    workspace, email = as_operator(kan)
    process = support.start_cli(["list", "--workspace-public-id", workspace["publicId"]],
                                support.make_conninfo(saturated, connect_timeout=30),
                                {"AGENT_IDENTITY_ADMIN_EMAIL": email})
    time.sleep(1.5)  # started, connected, and queued behind the holder
    assert process.poll() is None
    sent = time.monotonic()
    process.send_signal(signum)
    said = process.stderr.readline()  # the tool's one line, the moment it is written
    acted = time.monotonic() - sent
    process.communicate(timeout=30)
    assert said == "agent-identity: error: interrupted; a change not yet committed was rolled back\n"
    assert acted < 1, acted
    assert process.returncode == 128 + signum
