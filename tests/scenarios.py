"""Reliability scenarios, shared by the tests (which assert on them) and bench/reliability.py
(which prints them): many concurrent runs of the CLI against one identity, and the
audit log replayed against the final state.

Each scenario starts real processes of the CLI at once against a real database
and returns plain figures.
"""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import dataclass, field

import psycopg

from tests import support

# The documented exit codes (README, help, docs/usage.md).
DOCUMENTED_EXIT_CODES = {0, 1, 2, 3, 4, 5, 6, 7, 130}
# What the replay of an identity's audit log says each action leads to.
REPLAY = {
    "identity.created": lambda status: "active",
    "identity.paused": lambda status: "paused",
    "identity.resumed": lambda status: "active",
    "identity.revoked": lambda status: "revoked",
    "identity.token_rotated": lambda status: status,
    "identity.token_revoked": lambda status: status,
}


@dataclass
class Figures:
    """What one scenario saw."""

    name: str
    runs: int = 0
    successes: int = 0
    conflicts: int = 0
    exit_codes: dict[int, int] = field(default_factory=dict)
    tracebacks: int = 0
    undocumented_exits: int = 0
    lost_writes: int = 0
    problems: list[str] = field(default_factory=list)


def run_at_once(dsn: str, email: str, commands: list[list[str]]) -> list[support.Run]:
    """Start every command as its own process, then wait for all of them."""
    env = support.cli_env(dsn, AGENT_IDENTITY_ADMIN_EMAIL=email)
    processes = [
        (args, subprocess.Popen([sys.executable, str(support.SCRIPT), *args], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for args in commands
    ]
    runs = []
    for args, process in processes:
        stdout, stderr = process.communicate(timeout=120)
        runs.append(support.Run(args, process.returncode, stdout, stderr))
    return runs


def tally(name: str, runs: list[support.Run]) -> Figures:
    figures = Figures(name, runs=len(runs))
    for run in runs:
        figures.exit_codes[run.code] = figures.exit_codes.get(run.code, 0) + 1
        figures.successes += run.code == 0
        figures.conflicts += run.code == 5
        if "Traceback" in run.stderr:
            figures.tracebacks += 1
        if run.code not in DOCUMENTED_EXIT_CODES or run.code == 1:
            figures.undocumented_exits += 1
            figures.problems.append(f"{run.args[0]} exited {run.code}: {run.stderr.strip()[:200]}")
    return figures


def identity_id(conn: psycopg.Connection, workspace_id: int, slug: str) -> int | None:
    row = conn.execute('SELECT id FROM agent_identity WHERE "workspaceId" = %s AND slug = %s',
                       (workspace_id, slug)).fetchone()
    return row and row[0]


def concurrent_rotations(dsn: str, workspace: dict, email: str, slug: str, runs: int = 16) -> Figures:
    """runs rotations of one identity at once: one live token, one unbroken chain, one audit row each."""
    results = run_at_once(dsn, email, [
        ["rotate", "--workspace-public-id", workspace["publicId"], "--slug", slug, "--confirm", "--json"]
    ] * runs)
    figures = tally("concurrent rotate", results)
    with psycopg.connect(dsn) as conn:
        ident = identity_id(conn, workspace["id"], slug)
        tokens = conn.execute(
            """SELECT id, "rotatedFromId", "revokedAt" IS NULL AND
                      ("expiresAt" IS NULL OR "expiresAt" > timezone('utc', now()))
               FROM agent_token WHERE "agentIdentityId" = %s ORDER BY id""", (ident,)).fetchall()
        audited = conn.execute(
            """SELECT count(*) FROM agent_audit_event WHERE "agentIdentityId" = %s AND action = 'identity.token_rotated'""",
            (ident,)).fetchone()[0]
    live = sum(1 for _, _, is_live in tokens if is_live)
    if live != 1:
        figures.problems.append(f"{live} live tokens, not 1")
    chain = [rotated_from for _, rotated_from, _ in tokens]
    if chain != [None] + [token_id for token_id, _, _ in tokens[:-1]]:
        figures.problems.append(f"rotatedFromId links do not form one chain: {chain}")
    figures.lost_writes = abs(audited - figures.successes) + abs(len(tokens) - 1 - figures.successes)
    return figures


def concurrent_creates(dsn: str, workspace: dict, email: str, slug: str, runs: int = 16) -> Figures:
    """runs creates of one slug at once: exactly one succeeds, the others are conflicts."""
    results = run_at_once(dsn, email, [
        ["create", "--workspace-public-id", workspace["publicId"], "--slug", slug, "--display-name", "Race",
         "--token-name", "t", "--scopes", "boards:read", "--confirm", "--json"]
    ] * runs)
    figures = tally("concurrent create", results)
    with psycopg.connect(dsn) as conn:
        identities = conn.execute('SELECT count(*) FROM agent_identity WHERE "workspaceId" = %s AND slug = %s',
                                  (workspace["id"], slug)).fetchone()[0]
        ident = identity_id(conn, workspace["id"], slug)
        audited = conn.execute(
            """SELECT count(*) FROM agent_audit_event WHERE "agentIdentityId" = %s AND action = 'identity.created'""",
            (ident,)).fetchone()[0]
    if (figures.successes, figures.conflicts, identities, audited) != (1, runs - 1, 1, 1):
        figures.problems.append(
            f"{figures.successes} successes, {figures.conflicts} conflicts, {identities} identities, "
            f"{audited} audit rows; expected 1, {runs - 1}, 1, 1")
    figures.lost_writes = abs(audited - figures.successes)
    return figures


def concurrent_mixed(dsn: str, workspace: dict, email: str, slug: str, runs: int = 16, seed: int = 0) -> Figures:
    """pause, resume, revoke and rotate at once, in random order: the audit log replays to the final state."""
    rng = random.Random(seed)
    commands = [
        [rng.choice(["pause", "resume", "revoke", "rotate"]), "--workspace-public-id", workspace["publicId"],
         "--slug", slug, "--confirm", "--json"]
        for _ in range(runs)
    ]
    results = run_at_once(dsn, email, commands)
    figures = tally("concurrent pause/resume/revoke/rotate", results)
    with psycopg.connect(dsn) as conn:
        ident = identity_id(conn, workspace["id"], slug)
        final = conn.execute("SELECT status::text FROM agent_identity WHERE id = %s", (ident,)).fetchone()[0]
        events = conn.execute(
            """SELECT action, metadata->>'previousStatus' FROM agent_audit_event
               WHERE "agentIdentityId" = %s AND action <> 'access.denied' ORDER BY id""", (ident,)).fetchall()
        live = conn.execute(
            """SELECT count(*) FROM agent_token WHERE "agentIdentityId" = %s AND "revokedAt" IS NULL""",
            (ident,)).fetchone()[0]
    status = None
    for action, previous in events:
        if status is not None and previous != status:
            figures.problems.append(f"{action} recorded previousStatus {previous}, but the replay says {status}")
        status = REPLAY[action](status)
    if status != final:
        figures.problems.append(f"replaying the audit log gives {status}, the identity is {final}")
    if final == "revoked" and live:
        figures.problems.append(f"revoked, yet {live} tokens are not revoked")
    changed = sum(1 for run in results if run.code == 0 and run.json.get("changed"))
    figures.lost_writes = abs(changed - (len(events) - 1))
    return figures
