"""Reliability scenarios, shared by the tests (which assert on them) and bench/reliability.py
(which prints them): many concurrent runs of the CLI against one identity, and the
audit log replayed against the final state.

Each scenario starts real processes of the CLI at once against a real database
and returns plain figures.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field

import psycopg

import agent_identity_admin as tool
from tests import support

# The documented exit codes: the tool's own table (README, help and docs/usage.md say it).
DOCUMENTED_EXIT_CODES = {code for exit in tool.EXIT_CODES for code in exit.codes}
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
    processes = [(args, support.start_cli(args, dsn, {"AGENT_IDENTITY_ADMIN_EMAIL": email})) for args in commands]
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
    figures = tally(f"concurrent mixed changes, seed {seed}", results)
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


# --- hostile input: main() driven with generated argument lists -------------------

# The whole command line, from the tool's own table: every command, each of its options
# and what each takes (a flag, a value to type, or choices), so a new command or option
# is fuzzed on the day it lands.
SPEC = tool.completion_spec(tool.build_parser())
COMMANDS = list(tool.COMMANDS)
FLAGS = sorted({option for options in SPEC.values() for option in options if option.startswith("--")}) + [
    "-h", "--version", "--bogus", "--", "--conf", "--dry"]
CHOICES = sorted({choice for options in SPEC.values() for values in options.values() if values for choice in values})
# Values at and over every limit, and the usual suspects. None holds "/", so a
# token file can only be made in the scratch folder the fuzzing runs in.
HOSTILE = [
    "", " ", "-", "x" * 100_000, "'; DROP TABLE agent_identity; --", "\x00", "a\x00b", "\x1b[2J", "line\nbreak",
    "\u202eevil", "\u200bzero", "\U000e0041tag", "\ud800", "ünïcødé", "🤖 bot", "a" * 64, "a" * 65, "x" * 255,
    "x" * 256, "r" * 1000, "r" * 1001, "0", "-1", "²", "1e309", "nan", "inf", "1000", "1001", "365d", "366d",
    "never", "7d", "8d", "0m", "30m", "24h", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00",
    "2026-11-28T09:00:00Z", "1:" + "a" * 64, "boards:read", "boards:read,cards:write", "boards:reed", ",", "%s",
    "%(slug)s", "{lock}", "$1", "kan_agent_", "Ab12Cd34Ef56_" + "Zz9Yy8Xx7" * 5, "pg_catalog", "public",
    "a@b", "ghost@example.com", "Ab12Cd34Ef56", "token.txt", "..", *CHOICES,
]
MUTATING = {name for name, command in tool.COMMANDS.items() if command.changes}


def argv_strategy(workspace_public_id: str, slug: str, email: str):
    """Mostly nonsense, sometimes a command of the table with hostile values in its own options."""
    from hypothesis import strategies as st

    text = st.text(alphabet=st.characters(blacklist_characters="/"), max_size=40)
    value = st.one_of(st.sampled_from(HOSTILE), text, st.sampled_from([workspace_public_id, slug, email]),
                      st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}", fullmatch=True))
    word = st.one_of(st.sampled_from(FLAGS), value)
    nonsense = st.builds(lambda before, command, after: before + command + after,
                         st.lists(word, max_size=4), st.lists(st.sampled_from(COMMANDS + ["frob"]), max_size=1),
                         st.lists(word, max_size=10))

    def option(command: str):
        """One of command's options, with what it takes: nothing, a choice or a hostile value."""
        return st.sampled_from(sorted(SPEC[command])).flatmap(lambda name: (
            st.just([name]) if SPEC[command][name] is None or not name.startswith("--")
            else st.sampled_from(SPEC[command][name]).map(lambda choice: [name, choice]) if SPEC[command][name]
            else value.map(lambda given: [name, given])))

    def invocation(command: str):
        named = st.sampled_from([["--workspace-public-id", workspace_public_id], ["--workspace", workspace_public_id],
                                 []])
        mode = st.sampled_from([["--confirm"], ["--dry-run"], []]) if command in MUTATING else st.just([])
        slugs = st.one_of(st.just(["--slug", slug]), st.just([]),
                          st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}", fullmatch=True).map(lambda s: ["--slug", s]))
        return st.tuples(named, slugs, st.lists(option(command), max_size=5),
                         mode).map(lambda parts: [command, *(word for part in parts[:2] for word in part),
                                                  *(word for given in parts[2] for word in given), *parts[3]])

    templates = st.one_of(
        st.sampled_from(COMMANDS).flatmap(invocation),
        st.builds(lambda s, d, t, sc, r, mode: ["create", "--workspace-public-id", workspace_public_id, "--slug", s,
                                                "--display-name", d, "--token-name", t, "--scopes", sc, "--reason",
                                                r, mode],
                  st.one_of(st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True), value),
                  value, value, st.sampled_from(["boards:read", "cards:read,cards:write", "x"]), value,
                  st.sampled_from(["--confirm", "--dry-run"])),
        st.builds(lambda command, actor, mode: [command, "--workspace-public-id", workspace_public_id, "--slug", slug,
                                                "--admin-user-email", actor, mode],
                  st.sampled_from(["inspect", "pause", "revoke", "list"]),
                  st.one_of(st.sampled_from(["ghost@example.com", email.upper()]), value),
                  st.sampled_from(["--confirm", "--dry-run", "--json"])),
    )
    # Mostly nonsense: a valid create or rotate costs an argon2 hash.
    return st.one_of(nonsense, nonsense, templates, templates)


def fingerprint(conn: psycopg.Connection) -> tuple:
    """The agent tables' contents, less access.denied events; and how many of those there are."""
    return conn.execute("""
        SELECT (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY id), '')) FROM agent_identity t),
               (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY id), '')) FROM agent_token t),
               (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY id), '')) FROM agent_audit_event t
                WHERE action <> 'access.denied'),
               (SELECT count(*) FROM agent_audit_event WHERE action = 'access.denied')
    """).fetchone()


def fuzz_main(dsn: str, workspace: dict, email: str, slug: str, examples: int, fail_fast: bool = True) -> Figures:
    """Drive main() in this process with generated argument lists and standard input.

    For every example: no traceback, no internal error (exit 1), a documented exit
    code, and the agent tables unchanged unless a confirmed mutation succeeded (a
    refusal, exit 4, may add its access.denied event). Derandomized: the same
    examples every run.
    """
    import contextlib
    import io
    import os
    import tempfile

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    figures = Figures("hypothesis: main() on generated argv")
    conn = psycopg.connect(dsn, autocommit=True)

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(argv=argv_strategy(workspace["publicId"], slug, email),
           stdin=st.sampled_from(["", "garbage\n", "kan_agent_x\n", tool.new_token(tool.new_public_id())]))
    def example(argv, stdin):
        figures.runs += 1
        before = fingerprint(conn)
        out, err = io.StringIO(), io.StringIO()
        saved_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = tool.main(argv, out, err)
        finally:
            sys.stdin = saved_stdin
        after = fingerprint(conn)
        figures.exit_codes[code] = figures.exit_codes.get(code, 0) + 1
        problem = None
        if "Traceback" in err.getvalue() and not ("--debug" in argv and code != 1):  # asked for, of an error
            figures.tracebacks += 1
            problem = "traceback"
        elif code not in DOCUMENTED_EXIT_CODES or code in (1, 130):
            figures.undocumented_exits += 1
            problem = f"exit {code}: {err.getvalue().strip()[:300]}"
        elif after[:3] != before[:3] and not (code == 0 and "--confirm" in argv):
            figures.lost_writes += 1
            problem = "the agent tables changed"
        elif after[3] != before[3] and code != 4:
            figures.lost_writes += 1
            problem = "an access.denied event without a refusal"
        if problem:
            figures.problems.append(f"{problem} for argv {[a[:60] for a in argv]}")
            if fail_fast:
                raise AssertionError(figures.problems[-1])

    saved_env = {key: os.environ.get(key) for key in ("DATABASE_URL", "POSTGRES_URL", "AGENT_IDENTITY_ADMIN_EMAIL")}
    saved_cwd = os.getcwd()
    try:
        os.environ.update(DATABASE_URL=dsn, AGENT_IDENTITY_ADMIN_EMAIL=email)
        os.environ.pop("POSTGRES_URL", None)
        with tempfile.TemporaryDirectory(prefix="agent-identity-fuzz-") as scratch:
            os.chdir(scratch)
            example()
    finally:
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        conn.close()
    figures.successes, figures.conflicts = figures.exit_codes.get(0, 0), figures.exit_codes.get(5, 0)
    return figures
