"""Concurrency and faults: nothing lost, nothing half-written, nothing hung, no traceback."""

import json
import signal
import socket
import subprocess
import time

import pytest

from tests import scenarios, support


def assert_clean(figures: scenarios.Figures):
    assert figures.tracebacks == 0, figures.problems
    assert figures.undocumented_exits == 0, figures.problems
    assert figures.lost_writes == 0, figures.problems
    assert figures.problems == []


def test_sixteen_concurrent_rotations(cli_dsn, operator):
    operator.create("spinner")
    figures = scenarios.concurrent_rotations(cli_dsn, operator.workspace, operator.email, "spinner")
    assert_clean(figures)
    assert figures.successes == 16, figures.exit_codes


def test_sixteen_concurrent_creates_of_one_slug(cli_dsn, operator):
    figures = scenarios.concurrent_creates(cli_dsn, operator.workspace, operator.email, "contested")
    assert_clean(figures)
    assert figures.exit_codes == {0: 1, 5: 15}


@pytest.mark.parametrize("seed", [1, 2])
def test_concurrent_mixed_changes_replay_to_the_final_state(cli_dsn, operator, seed):
    operator.create(f"mixed-{seed}")
    figures = scenarios.concurrent_mixed(cli_dsn, operator.workspace, operator.email, f"mixed-{seed}", seed=seed)
    assert_clean(figures)
    assert set(figures.exit_codes) <= {0, 5}


# --- faults -------------------------------------------------------------------


def start(database, email, *args) -> subprocess.Popen:
    return support.start_cli(list(args), database, {"AGENT_IDENTITY_ADMIN_EMAIL": email})


def test_a_held_lock_makes_the_tool_give_up_after_the_lock_timeout(db, database, operator):
    operator.create("held")
    before = support.snapshot(db)
    lock = support.HeldLock(database, operator.workspace["id"], "held")
    try:
        process = start(database, operator.email, "rotate", "--workspace-public-id", operator.workspace["publicId"],
                        "--slug", "held", "--lock-timeout", "1", "--confirm", "--json")
        stdout, _, elapsed = support.waited(db, process)
    finally:
        lock.release()
    assert process.returncode == 5
    # It names who holds the lock: the pid, role and application of the session to chase.
    assert json.loads(stdout)["error"]["message"] == (
        f"busy: another session is changing this workspace, held by pid {lock.pid} (role {lock.role}, "
        'application "another-operator") (waited 1 s for its lock); nothing was written: try again, or wait '
        "longer with --lock-timeout")
    assert 0.8 <= elapsed < 3, elapsed
    assert support.snapshot(db) == before


def interrupt_while_waiting(db, database, cli_dsn, operator, command: str, slug: str, interrupt) -> support.Run:
    """Run a mutation while another session holds the identity's lock, and call
    interrupt(backend_pid, process) once the tool waits for it."""
    lock = support.HeldLock(database, operator.workspace["id"], slug)
    try:
        process = start(cli_dsn, operator.email, command, "--workspace-public-id", operator.workspace["publicId"],
                        "--slug", slug, "--lock-timeout", "30", "--confirm")
        interrupt(support.waiting_backend(db), process)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        lock.release()
    return support.Run([command], process.returncode, stdout, stderr)


def test_a_killed_connection_is_exit_6_with_nothing_written(db, database, cli_dsn, operator):
    operator.create("severed")
    before = support.snapshot(db)
    result = interrupt_while_waiting(
        db, database, cli_dsn, operator, "rotate", "severed",
        lambda backend, process: db.execute("SELECT pg_terminate_backend(%s)", (backend,)))
    assert result.code == 6, result.stderr
    assert result.stderr.startswith("agent-identity: error: lost the database connection: ")
    assert result.stderr.rstrip().endswith("nothing was written")
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
    assert support.snapshot(db) == before


def test_ctrl_c_during_a_mutation_rolls_back(db, database, cli_dsn, operator):
    operator.create("interrupted")
    before = support.snapshot(db)
    result = interrupt_while_waiting(db, database, cli_dsn, operator, "revoke", "interrupted",
                                     lambda backend, process: process.send_signal(signal.SIGINT))
    assert result.code == 130, result.stderr
    assert result.stderr == "agent-identity: error: interrupted; a change not yet committed was rolled back\n"
    assert support.snapshot(db) == before


def test_a_server_that_never_answers_is_exit_6_within_the_connect_timeout():
    """A port that accepts connections but never speaks PostgreSQL."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        started = time.monotonic()
        result = support.run_cli(["list", "--workspace-public-id", "Ab12Cd34Ef56"],
                                 f"postgresql://admin:Hush-Hush-42@127.0.0.1:{port}/kan",
                                 {"AGENT_IDENTITY_ADMIN_EMAIL": "a@example.com"})
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert result.code == 6
    assert result.stderr.startswith(
        f"agent-identity: error: cannot connect to database kan at 127.0.0.1:{port} as role admin: ")
    assert "Hush-Hush-42" not in result.stderr
    assert 4 <= elapsed < 9, elapsed


def test_a_refused_port_is_exit_6_at_once():
    started = time.monotonic()
    result = support.run_cli(["list", "--workspace-public-id", "Ab12Cd34Ef56"],
                             "postgresql://admin:Hush-Hush-42@127.0.0.1:9/kan",
                             {"AGENT_IDENTITY_ADMIN_EMAIL": "a@example.com"})
    assert result.code == 6
    assert "127.0.0.1:9" in result.stderr and "Hush-Hush-42" not in result.stderr
    assert time.monotonic() - started < 3
