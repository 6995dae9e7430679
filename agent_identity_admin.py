"""agent-identity: manage the machine identities of AI agents in a Kan database.

A machine identity is a service account that lets an agent reach one Kan
workspace through the MCP server with a bearer token. This tool is how a
maintainer creates identities, rotates their tokens, pauses, resumes and
revokes them, and inspects what exists.

Promises, in the order the code keeps them:
- nothing is written without --confirm, and --dry-run shows exactly what
  would be written, then rolls back;
- every command that touches a workspace first checks, in one query, that
  the workspace exists and that the actor may manage it (Kan's
  ``workspace:manage`` permission);
- every change is one transaction holding a lock on the identity, and
  writes its audit event in that same transaction;
- a raw token is shown once on stdout and never stored: the database keeps
  an argon2id hash of it;
- bad input is a one-line error with a documented exit code, never a
  traceback, never a partial write.

Run ``agent-identity help`` for usage. psycopg and argon2 are imported only
by the commands that need them, so help and usage errors start fast.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import re
import sys
import unicodedata
import zlib
from datetime import datetime, timedelta, timezone

__version__ = "0.5.0"

PROG = "agent-identity"
APPLICATION_NAME = "agent-identity"


class LazyPattern:
    """A regular expression compiled the first time it is used, as re.compile's would be:
    a run uses few of the tool's, and compiling all of them at import cost 3 ms of every
    start-up. pattern is its source."""

    def __init__(self, pattern: str, flags: int = 0):
        self.pattern, self.flags, self.compiled = pattern, flags, None

    def __getattr__(self, name: str):  # fullmatch, search, sub, finditer, ...: the compiled pattern's
        if self.compiled is None:
            self.compiled = re.compile(self.pattern, self.flags)
        return getattr(self.compiled, name)


# --- Vocabulary -------------------------------------------------------------

SCOPES = (
    "workspace:read",
    "boards:read",
    "boards:write",
    "lists:read",
    "lists:write",
    "cards:read",
    "cards:write",
    "comments:read",
    "comments:write",
    "labels:read",
    "labels:write",
    "checklists:read",
    "checklists:write",
    "members:read",
)
STATUSES = ("active", "paused", "revoked")
MANAGE_PERMISSION = "workspace:manage"

# What each status command does: the status it leads to, the statuses it
# may start from, and the action recorded in the audit log.
TRANSITIONS = {
    "pause": ("paused", ("active",), "identity.paused"),
    "resume": ("active", ("paused",), "identity.resumed"),
    "revoke": ("revoked", ("active", "paused"), "identity.revoked"),
}
# Every action the audit log records; access.denied is a refused attempt.
AUDIT_ACTIONS = (
    "identity.created",
    "identity.token_rotated",
    "identity.paused",
    "identity.resumed",
    "identity.revoked",
    "identity.token_revoked",
    "access.denied",
)

# Token lifetimes: create and rotate default to 90 days, allow at most 365,
# and "never" only when asked for. A rotation's grace keeps old tokens alive
# for at most a week. Live tokens expiring within a week are warned about.
EXPIRES_DEFAULT = "90d"
EXPIRES_MAX = timedelta(days=365)
GRACE_MAX = timedelta(days=7)
EXPIRING_SOON = timedelta(days=7)
EXPIRING_WITHIN_DEFAULT = "7d"

# What an access review (review) flags, each with what deals with it: an identity with a
# live token that never expires; one none of whose tokens was used within --idle (and
# older than that); one whose newest live token is older than --max-age; one that nobody
# who still manages the workspace made or issued a live token of (its maker left).
ROTATE_ACTION = "--grace 1h --token-file -"  # the old token runs an hour more; the new one goes to a pipe
REVIEW_FINDINGS = {  # finding: (its command, what more it takes, what it means)
    "never-expires": ("rotate", "--expires-in 90d " + ROTATE_ACTION, "holds a live token that never expires (or not within a "
                                                         "year): rotate it into the secret manager with an expiry"),
    "unused": ("pause", "", "no token of it was used within --idle: pause it (revoke it if it is paused already)"),
    "stale": ("rotate", ROTATE_ACTION, "its newest live token is older than --max-age: rotate it into the secret manager"),
    "orphaned": ("rotate", ROTATE_ACTION, "nobody who still manages the workspace made it or issued its live token: a "
                                    "maintainer who does takes it over by rotating it, or revokes it"),
}
REVIEW_IDLE_DEFAULT = "30d"
REVIEW_MAX_AGE_DEFAULT = "90d"
DURATION_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
DURATION_RE = LazyPattern(r"(?P<count>[0-9]{1,6})(?P<unit>[mhdw])")

# Why verify refuses a token, in the order a server checks (docs/tokens.md).
VERIFY_REASONS = (
    "malformed",
    "bad_checksum",
    "unknown_token",
    "hash_mismatch",
    "token_revoked",
    "token_expired",
    "identity_paused",
    "identity_revoked",
    "workspace_deleted",
)
TOKEN_INPUT_MAX = 4096  # read no more than this from standard input or a token file

SLUG_MAX = 64
DB_SCHEMA_DEFAULT = "public"  # where Kan's migrations put its tables
NAME_MAX = 255
REASON_MAX = 1000
EMAIL_MAX = 255
# Session limits: how long to wait for another session's lock on an identity
# (--lock-timeout), the longest any statement may run, and how long a
# transaction may sit idle (a suspended tool must not hold locks for ever).
LOCK_TIMEOUT_DEFAULT = "5"
LOCK_TIMEOUT_MIN = 0.001
LOCK_TIMEOUT_MAX = 600
STATEMENT_TIMEOUT_MS = 30_000
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000
CONNECT_TIMEOUT_DEFAULT = 5
PATH_MAX = 4096
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 1000
EVENTS_DEFAULT = 10
EVENTS_MAX = 1000
AUDIT_LOOKBACK_MAX = timedelta(days=100 * 365)  # audit --since 52w and the like; beyond that, give a date

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PUBLIC_ID_LENGTH = 12
TOKEN_PREFIX = "kan_agent_"
SECRET_LENGTH = 43  # 43 base62 characters carry 256 bits
CHECKSUM_LENGTH = 6  # base62 of a CRC32, zero-padded
# argon2id sized for 256-bit random secrets, not for passwords: nobody can
# search 2^256 secrets whatever each guess costs, so the cost buys no safety
# and is kept near the floor (under 1 ms and 2 MiB a check; docs/tokens.md).
ARGON2_TIME_COST = 1
ARGON2_MEMORY_KIB = 2048
ARGON2_PARALLELISM = 1
# How a hash made with these parameters begins (the PHC string carries them).
ARGON2_PHC_PREFIX = f"$argon2id$v=19$m={ARGON2_MEMORY_KIB},t={ARGON2_TIME_COST},p={ARGON2_PARALLELISM}$"

# A PostgreSQL schema name as --db-schema takes it: a plain identifier, and not one of
# PostgreSQL's own (pg_catalog, pg_temp, pg_toast, information_schema).
DB_SCHEMA_RE = LazyPattern(r"(?!pg_)(?!information_schema$)[A-Za-z_][A-Za-z0-9_]{0,62}", re.IGNORECASE)
SLUG_RE = LazyPattern(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
PUBLIC_ID_RE = LazyPattern(r"[0-9A-Za-z]{%d}" % PUBLIC_ID_LENGTH)
TOKEN_RE = LazyPattern(
    r"%s(?P<public_id>[0-9A-Za-z]{%d})_(?P<secret>[0-9A-Za-z]{%d,})(?P<checksum>[0-9A-Za-z]{%d})"
    % (TOKEN_PREFIX, PUBLIC_ID_LENGTH, SECRET_LENGTH, CHECKSUM_LENGTH)
)
# Anything that looks like a token or a part of its secret, well formed or not: refused
# in every value the tool would store or echo, and blanked from every message. In
# order: our prefix and a public id with anything after it; a token without its prefix
# (public id, _, the secret); a secret alone (a run as long as a secret and its
# checksum). The prefix and public id alone (kan_agent_Ab12Cd34Ef56) name a token
# without revealing it, and may be written anywhere, as may a name that only begins
# like one (the role kan_agent_server); a long run is a secret only if it mixes capitals, small
# letters and digits, as a random one almost surely does and hex or words do not.
TOKEN_LIKE_RE = LazyPattern(r"%s[0-9A-Za-z]{%d}(?:_[0-9A-Za-z_]*|[0-9A-Za-z]+)|[0-9A-Za-z]{%d}_[0-9A-Za-z]{%d,}|"
                            r"[0-9A-Za-z]{%d,}" % (TOKEN_PREFIX, PUBLIC_ID_LENGTH, PUBLIC_ID_LENGTH, SECRET_LENGTH,
                                                   SECRET_LENGTH + CHECKSUM_LENGTH))
# Characters that act on a terminal or read as something they are not: controls (Cc:
# escape sequences, newlines, carriage returns), format characters (Cf: bidirectional
# marks and overrides, zero-width spaces and joiners, tag characters), line and
# paragraph separators (Zl, Zp), and unpaired surrogates (Cs: an undecodable byte).
# Refused in every value the tool stores; shown as escapes in everything it prints.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

# --- Errors and exit codes --------------------------------------------------

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_FORBIDDEN = 4
EXIT_CONFLICT = 5
EXIT_DATABASE = 6
EXIT_INVALID_TOKEN = 7
EXIT_UNDELIVERED = 8
EXIT_EXPIRING = 9  # expiring: live tokens expire within the window (for cron and CI)
EXIT_CHAIN_BROKEN = 10  # audit verify: an audit chain is broken, or does not extend the pinned head
EXIT_FINDINGS = 11  # review: an identity has a finding (for cron, as expiring's 9)
EXIT_HANGUP = 129  # 128 + the signal's number, as shells report it
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
EXIT_TERMINATED = 143

class ExitCode(collections.namedtuple("ExitCode", "codes kind meaning")):
    """A documented exit code (or codes that mean one thing): its kind, as a --json error
    names it, and its meaning — the one text of help, README.md and docs/usage.md
    (a test holds every table of codes in them to this one)."""

    __slots__ = ()


EXIT_CODES = (
    ExitCode((EXIT_OK,), "ok", 'success, including "nothing to change"'),
    ExitCode((EXIT_INTERNAL,), "internal", "unexpected internal error (one line; `--debug` shows the traceback)"),
    ExitCode((EXIT_USAGE,), "usage", "usage or validation error, found before connecting to the database"),
    ExitCode((EXIT_NOT_FOUND,), "not_found", "workspace or identity not found"),
    ExitCode((EXIT_FORBIDDEN,), "forbidden",
             "actor not allowed (not a Kan user, not an active member, or lacks `workspace:manage`); for a check "
             "across workspaces, the actor manages none: nothing was checked"),
    ExitCode((EXIT_CONFLICT,), "conflict",
             "conflict or invalid state (slug taken, identity revoked, the identity busy, ...)"),
    ExitCode((EXIT_DATABASE,), "database",
             "database unreachable or not set up (not a Kan database, the agent tables missing or out of date, a "
             "grant missing: run `agent-identity doctor`), a pooler's queue full past the connect limit, or audit "
             "events dropped by a trigger or rule (nothing committed); for `doctor`, a check failed"),
    ExitCode((EXIT_INVALID_TOKEN,), "invalid_token", "`verify`: the token is not valid (the output says why)"),
    ExitCode((EXIT_UNDELIVERED,), "undelivered",
             "the output or the token file could not be written (stdout closed or full, a file size limit); after "
             "a change, stderr says it was committed and what to do (rotate for a token)"),
    ExitCode((EXIT_EXPIRING,), "expiring", "`expiring`: live tokens expire within the window, or active identities "
                                           "have no live token (the list says which)"),
    ExitCode((EXIT_CHAIN_BROKEN,), "chain_broken",
             "`audit verify`: an audit chain (or an export) is broken, disagrees with its tables or an earlier "
             "export, or no longer holds a pinned head (the output says where and how)"),
    ExitCode((EXIT_FINDINGS,), "findings",
             "`review`: an identity has a finding (never-expires, unused, stale, orphaned: the list says which, "
             "and the command that deals with it)"),
    ExitCode((EXIT_HANGUP, EXIT_INTERRUPTED, EXIT_TERMINATED), "interrupted",
             "hangup, Ctrl-C, terminated (SIGHUP, SIGINT, SIGTERM); a transaction not yet committed was rolled back "
             "and an unfilled token file removed; after a commit, stderr says so"),
    ExitCode((EXIT_BROKEN_PIPE,), "broken_pipe",
             "the reader of stdout went away (`list | head`, a closed pipe): quiet for a read; after a change, "
             "stderr says it was committed; `verify` keeps its 0 or 7"),
)
EXIT_KINDS = {code: exit.kind for exit in EXIT_CODES for code in exit.codes}


def exit_codes_help() -> str:
    """The table of exit codes as help prints it, 80 columns wide."""
    import textwrap

    lines = ["exit codes:"]
    for exit in EXIT_CODES:
        codes = ", ".join(map(str, exit.codes))
        lines += textwrap.wrap(exit.meaning.replace("`", ""), 78, initial_indent=f"  {codes:<2} ",
                               subsequent_indent="     ")
    return "\n".join(lines)


EXIT_CODES_HELP = exit_codes_help()


class AdminError(Exception):
    """A failure the operator can act on: one line, one exit code."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, as Ctrl-C's KeyboardInterrupt is
    (so psycopg cancels a running query, and transactions roll back)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum


def exit_code_of_interrupt(exc: KeyboardInterrupt) -> int:
    return exc.exit_code if isinstance(exc, Interrupted) else EXIT_INTERRUPTED


class Signals:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP end a command alike: as Interrupted, a
    KeyboardInterrupt raised where the program is (so psycopg cancels a running query,
    and transactions roll back). While output that must stay whole is written (a line of
    audit --jsonl), the first signal waits for the write to end; a second acts at once.

    A wait the server cannot cut short (a pooler's queue ignores a cancel) must not hold
    a signal up: if the program is still waiting ACT_WITHIN seconds after one, the signal
    is raised again, and psycopg's wait for its cancel ends there. The same alarm
    (SIGALRM) bounds a wait that deadline() limits."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")
    ACT_WITHIN = 0.25  # seconds: with the exit that follows, within the second Ctrl-C is promised to act in
    WRITE_WITHIN = 0.5  # seconds a line being written gets to end whole (a stalled reader gets no more)

    def __init__(self):
        self.holding = False
        self.pending: int | None = None
        self.alarm: BaseException | None = None  # what SIGALRM raises, while armed
        self.active = False
        self.committed = False  # the command's change was committed: an interrupt from now on says so

    def interrupt(self, signum: int, frame) -> None:
        if self.holding and self.pending is None:  # the write gets a moment to end whole, not for ever
            self.pending = signum
            self.arm(self.WRITE_WITHIN, Interrupted(signum))
            return
        self.arm(self.ACT_WITHIN, Interrupted(signum))
        raise Interrupted(signum)

    def arm(self, seconds: float, error: BaseException | None) -> None:
        """Raise error in seconds (None, 0: disarm); only while installed, in the main thread."""
        import signal

        if self.active:
            self.alarm = error
            signal.setitimer(signal.ITIMER_REAL, seconds if error is not None else 0)

    def ring(self, signum: int, frame) -> None:
        error, self.alarm = self.alarm, None
        if error is not None:
            raise error

    @contextlib.contextmanager
    def deadline(self, seconds: float, error: BaseException):
        """The block is cut short by error if it has not ended within seconds (0: no limit)."""
        if not seconds:
            yield
            return
        self.arm(seconds, error)
        try:
            yield
        finally:
            if self.alarm is error:  # not a signal's follow-up, which stays armed
                self.arm(0, None)

    @contextlib.contextmanager
    def installed(self):
        """While a command runs, these signals interrupt it."""
        import signal

        previous = {}
        for name in (*self.NAMES, "SIGALRM"):
            handler = self.ring if name == "SIGALRM" else self.interrupt
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                previous[getattr(signal, name)] = signal.signal(getattr(signal, name), handler)
        self.active, self.committed, self.pending = signal.SIGALRM in previous, False, None
        try:
            yield self
        finally:
            self.arm(0, None)
            self.active = False
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextlib.contextmanager
    def whole(self):
        """Output written here ends whole, whatever signal comes while it is written."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None:
            self.arm(0, None)
            raise Interrupted(self.pending)


SIGNALS = Signals()  # the process's: main() installs it, transaction() bounds a pooler's wait with it


def forbid_core_dumps() -> None:
    """No core file, and (on Linux) no ptrace by others, for a process about to hold a token."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_DUMPABLE = 4
        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


class AccessDenied(AdminError):
    """Exit 4 from the access check, with what its access.denied audit event records."""

    def __init__(self, message: str, *, workspace_id: int | None, actor_id, condition: str,
                 token_public_id: str | None = None):
        super().__init__(EXIT_FORBIDDEN, message)
        self.workspace_id = workspace_id
        self.actor_id = actor_id
        self.condition = condition
        self.token_public_id = token_public_id


class ClaimRefused(AccessDenied):
    """Exit 4 for a proven login that claims to be somebody else: audited in the workspace
    the command names, or (naming none) in each one the claimed user manages."""

    def __init__(self, message: str, *, actor_id, claim: str):
        super().__init__(message, workspace_id=None, actor_id=actor_id, condition="claim_is_not_the_login")
        self.claim = claim


# --- Pure helpers: validation -----------------------------------------------


def is_invisible(char: str) -> bool:
    """A character of INVISIBLE_CATEGORIES."""
    return unicodedata.category(char) in INVISIBLE_CATEGORIES


def token_parts(text: str) -> list[tuple[int, int]]:
    """Where text holds a token with any of its secret (TOKEN_LIKE_RE), as (start, end)
    spans of text; invisible characters inside one do not hide it."""
    kept = [index for index, char in enumerate(text) if not is_invisible(char)]
    plain = "".join(text[index] for index in kept)
    spans = []
    for match in TOKEN_LIKE_RE.finditer(plain):
        part = match[0]
        if part.startswith(TOKEN_PREFIX) or "_" in part or all(
                any(test(char) for char in part) for test in (str.isupper, str.islower, str.isdigit)):
            spans.append((kept[match.start()], kept[match.end() - 1] + 1))
    return spans


def check_text(value: str, *, max_length: int, allow_empty: bool = False) -> str:
    """Refuse text that is too long, empty, holds a token's secret, or holds invisible
    characters."""
    if not allow_empty and not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if len(value) > max_length:
        raise argparse.ArgumentTypeError(f"is {len(value)} characters long; the limit is {max_length}")
    if not token_parts(value):
        for char in filter(is_invisible, value):
            kind = "a control" if unicodedata.category(char) == "Cc" else "an invisible"
            raise argparse.ArgumentTypeError(f"contains {kind} character (U+{ord(char):04X})")
    else:
        raise argparse.ArgumentTypeError(
            "contains a token with its secret, which would be stored and shown to every reader of the audit log; "
            "name a token by its public id instead"
        )
    return value


def parse_slug(value: str) -> str:
    """A slug is 1-64 characters of a-z, 0-9 and '-', not starting or ending with '-'."""
    if len(value) > SLUG_MAX:
        raise argparse.ArgumentTypeError(f"is {len(value)} characters long; the limit is {SLUG_MAX}")
    if not SLUG_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a slug: use a-z, 0-9 and '-', not starting or ending with '-'"
        )
    return value


def parse_workspace(value: str) -> str:
    """--workspace: a Kan workspace's public id or its slug (Kan's URLs show the slug)."""
    if PUBLIC_ID_RE.fullmatch(value) or (len(value) <= NAME_MAX and SLUG_RE.fullmatch(value)):
        return value
    raise argparse.ArgumentTypeError(f"{value[:40]!r} is neither a workspace slug nor a public id")


def parse_token_id(value: str) -> str:
    """A token's public id, bare or as kan_agent_<id> (how logs and scanners show it):
    that names a token without revealing it. A token with its secret is refused."""
    bare = value.removeprefix(TOKEN_PREFIX)
    if PUBLIC_ID_RE.fullmatch(bare):
        return bare
    if token_parts(value):
        raise argparse.ArgumentTypeError(
            f"is a whole token, secret and all (it is now in shell history and the process list: rotate it); "
            f"give only its public id, {TOKEN_PREFIX}{value[len(TOKEN_PREFIX):][:12]}"
        )
    raise argparse.ArgumentTypeError(f"{value[:40]!r} is not a token's public id (12 characters of 0-9, A-Z, a-z)")


def parse_public_id(value: str) -> str:
    """Kan's public ids are 12 base62 characters."""
    if not PUBLIC_ID_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is not a public id (12 characters of 0-9, A-Z, a-z)")
    return value


def parse_db_schema(value: str) -> str:
    """A schema name: letters, digits and _, not starting with a digit, at most 63 characters."""
    if not DB_SCHEMA_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value[:80]!r} is not a schema name: use letters, digits and _, at most 63, not starting with a digit"
        )
    return value


def quote_identifier(name: str) -> str:
    """A name that parse_db_schema accepted, quoted for SQL (it holds no double quote)."""
    return f'"{name}"'


def did_you_mean(word: str, choices) -> str:
    """" (did you mean X?)" for the closest of choices, or "": for scopes, options and commands.
    The one choice the word begins (--con: --confirm) is closest; else difflib's nearest."""
    import difflib

    choices = sorted(choices)
    started = [choice for choice in choices if choice.startswith(word)]
    close = started if len(started) == 1 else difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_scopes(value: str) -> list[str]:
    """Comma-separated scopes from the vocabulary, de-duplicated, in the order given."""
    scopes: list[str] = []
    for item in value.split(","):
        scope = item.strip()
        if not scope:
            continue
        if scope not in SCOPES:
            raise argparse.ArgumentTypeError(
                f"unknown scope {scope[:80]!r}{did_you_mean(scope, SCOPES)}; valid scopes: {', '.join(SCOPES)}"
            )
        if scope not in scopes:
            scopes.append(scope)
    if not scopes:
        raise argparse.ArgumentTypeError("give at least one scope")
    return scopes


def parse_display_name(value: str) -> str:
    return check_text(value, max_length=NAME_MAX)


def parse_reason(value: str) -> str:
    return check_text(value, max_length=REASON_MAX)


def parse_email(value: str) -> str:
    check_text(value, max_length=EMAIL_MAX)
    if value != value.strip():
        raise argparse.ArgumentTypeError(f"{quote(value)} has leading or trailing spaces")
    if "@" not in value:
        raise argparse.ArgumentTypeError(f"{value[:80]!r} is not an email address")
    return value


class Duration(collections.namedtuple("Duration", "text delta")):
    """A lifetime as the operator wrote it ("90d", str) and as a span (timedelta; None means never)."""

    __slots__ = ()


def parse_duration(value: str, *, maximum: timedelta, allow_zero: bool) -> Duration:
    """30m, 12h, 90d or 1w; "0" where a zero span makes sense."""
    if allow_zero and value == "0":
        return Duration(value, timedelta(0))
    match = DURATION_RE.fullmatch(value)
    if match is None:
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is not a duration: use a number and m, h, d or w, as 90d")
    delta = int(match["count"]) * DURATION_UNITS[match["unit"]]
    if not delta and not allow_zero:
        raise argparse.ArgumentTypeError("must be longer than zero")
    if delta > maximum:
        raise argparse.ArgumentTypeError(f"{value} is longer than the limit of {maximum.days} days")
    return Duration(value, delta)


def parse_expires_in(value: str) -> Duration:
    """A token's lifetime: at most 365 days, or "never" when asked for by name."""
    if value == "never":
        return Duration(value, None)
    return parse_duration(value, maximum=EXPIRES_MAX, allow_zero=False)


def parse_within(value: str) -> Duration:
    """expiring --within: 30m to 365d."""
    return parse_duration(value, maximum=EXPIRES_MAX, allow_zero=False)


class Moment(collections.namedtuple("Moment", "text ago at")):
    """A bound of audit's window as the operator wrote it: a span back from now
    (ago, a timedelta) or a moment (at, a naive UTC datetime); the other is None."""

    __slots__ = ()


def parse_moment(value: str) -> Moment:
    """audit --since/--until: a duration back from now (24h, 7d), or an ISO 8601 date or
    time; one without an offset is UTC, as every time the tool prints is."""
    if DURATION_RE.fullmatch(value):
        return Moment(value, parse_duration(value, maximum=AUDIT_LOOKBACK_MAX, allow_zero=False).delta, None)
    try:
        moment = datetime.fromisoformat(value) if value.isascii() else None
    except ValueError:
        moment = None
    if moment is None:
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is neither a duration (24h, 7d) nor an ISO time "
                                         "(2026-11-28T09:00:00Z)")
    if moment.tzinfo is not None:
        try:
            moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
        except OverflowError:  # 9999-12-31T23:59:59-23:59 is past the last moment a date can name
            raise argparse.ArgumentTypeError(f"{value[:40]!r} is out of range: give a time within the years 1 "
                                             "to 9999 in UTC") from None
    return Moment(value, None, moment)


def parse_action(value: str) -> str:
    if value not in AUDIT_ACTIONS:
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is not an audit action: use one of "
                                         f"{', '.join(AUDIT_ACTIONS)}")
    return value


def parse_grace(value: str) -> Duration:
    """How long a rotated-out token keeps working: 0 (revoke at once) to 7 days."""
    return parse_duration(value, maximum=GRACE_MAX, allow_zero=True)


def parse_lock_timeout(value: str) -> float:
    """Seconds to wait for a lock: at least 0.001 (PostgreSQL reads less than 1 ms as
    "wait for ever"), at most 600."""
    try:
        seconds = float(value) if value.isascii() else float("nan")
    except ValueError:
        seconds = float("nan")
    if not LOCK_TIMEOUT_MIN <= seconds <= LOCK_TIMEOUT_MAX:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from {LOCK_TIMEOUT_MIN} to {LOCK_TIMEOUT_MAX}"
        )
    return seconds


def parse_path(value: str) -> str:
    """A file path: anything the system allows (which excludes NUL) that is valid UTF-8,
    so that it can be shown, in --json too."""
    if not value or "\x00" in value or len(value) > PATH_MAX:
        raise argparse.ArgumentTypeError("is not a usable file path")
    if any(unicodedata.category(char) == "Cs" for char in value):
        raise argparse.ArgumentTypeError("is not valid UTF-8 (it holds undecodable bytes)")
    return value


def parse_database_url(value: str) -> str:
    if "\x00" in value:
        raise argparse.ArgumentTypeError("contains a NUL byte")
    return value


def parse_count(value: str, lowest: int, highest: int) -> int:
    """A whole number in ASCII digits (int() would take '٣' and choke on '²') within bounds."""
    if not (value.isascii() and value.isdigit()) or not lowest <= int(value) <= highest:
        raise argparse.ArgumentTypeError(f"must be a whole number from {lowest} to {highest}")
    return int(value)


def parse_list_limit(value: str) -> int:
    return parse_count(value, 1, LIST_LIMIT_MAX)


def parse_event_count(value: str) -> int:
    return parse_count(value, 0, EVENTS_MAX)


# --- Pure helpers: public ids, tokens, hashing ------------------------------


def random_base62(length: int) -> str:
    """Characters from the operating system's random source (only commands that make ids load it)."""
    import secrets

    return "".join(secrets.choice(BASE62) for _ in range(length))


def new_public_id() -> str:
    """A 12-character base62 public id, as Kan makes them."""
    return random_base62(PUBLIC_ID_LENGTH)


def base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, remainder = divmod(number, 62)
        digits.append(BASE62[remainder])
    return "".join(reversed(digits)).rjust(width, BASE62[0])


def token_checksum(body: str) -> str:
    """The base62 CRC32 of everything before the checksum."""
    return base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def new_token(token_public_id: str) -> str:
    """kan_agent_<token publicId>_<43 random base62><6 base62 CRC32 checksum>."""
    body = TOKEN_PREFIX + token_public_id + "_" + random_base62(SECRET_LENGTH)
    return body + token_checksum(body)


def parse_token(token: str) -> tuple[str | None, str | None]:
    """(public id, None) for a well-formed token, else (None, "malformed" or "bad_checksum").

    Both refusals need neither the database nor argon2.
    """
    match = TOKEN_RE.fullmatch(token)
    if match is None:
        return None, "malformed"
    if token_checksum(token[:-CHECKSUM_LENGTH]) != match["checksum"]:
        return None, "bad_checksum"
    return match["public_id"], None


def token_hasher():
    """argon2-cffi's hasher with the tool's parameters. Verifying reads the parameters
    from the stored hash, so hashes made with other ones (the defaults of earlier
    versions) verify too."""
    from argon2 import PasswordHasher

    return PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB,
                          parallelism=ARGON2_PARALLELISM)


def hash_token(token: str) -> str:
    """An argon2id PHC string of the whole token."""
    return token_hasher().hash(token)


def hash_digest(token_hash: str) -> str:
    """SHA-256, as hex, of a token's stored hash: what its issuing event records, so that a
    hash swapped in the table (a secret of someone's choosing) disagrees with the chain.
    It reveals nothing the stored hash does not."""
    import hashlib

    return hashlib.sha256(token_hash.encode("utf-8")).hexdigest()


# --- Pure helpers: the audit chain -------------------------------------------
#
# What the database's trigger computes in SQL when it writes an event, computed
# again here, from the rows alone, as docs/schema.md ("The audit chain") specifies.

CHAIN_ENCODING = "agent-identity audit v1"  # the events written before 0.5.0, which recorded no login
CHAIN_ENCODING_LOGIN = "agent-identity audit v2"  # v1's fields, then the login that wrote the event
CHAIN_START = "0" * 64  # the previous hash of a workspace's first event
HEAD_RE = LazyPattern(r"(?P<sequence>[1-9][0-9]{0,18}):(?P<hash>[0-9a-f]{64})")


class Head(collections.namedtuple("Head", "sequence hash")):
    """A chain's head, or a point of it: a sequence number and that event's hash."""

    __slots__ = ()

    def __str__(self) -> str:
        return f"{self.sequence}:{self.hash}"


# A pinned head, as audit head prints it: the workspace's public id, the sequence and the
# hash (the workspace may be left out where one workspace is verified).
PIN_RE = LazyPattern(r"(?<![0-9A-Za-z])(?:(?P<workspace>[0-9A-Za-z]{12}):)?" + HEAD_RE.pattern + "(?![0-9a-f])")


class Pin(collections.namedtuple("Pin", "workspace head")):
    """A head pinned somewhere the database's writers cannot reach: the workspace's public
    id (None: the one workspace verified) and the Head."""

    __slots__ = ()

    def __str__(self) -> str:
        return f"{self.workspace}:{self.head}" if self.workspace else str(self.head)


def parse_pin(value: str) -> Pin:
    """audit verify --expect-head WORKSPACE:SEQ:HASH (or SEQ:HASH), as audit head prints it."""
    before, colon, digest = value.strip().rpartition(":")  # the hash may come in capitals
    match = PIN_RE.fullmatch(before + colon + digest.lower()) if value.isascii() else None
    if match is None:
        raise argparse.ArgumentTypeError("must be WORKSPACE:SEQUENCE:HASH as `agent-identity audit head` prints it "
                                         "(a public id, a number, 64 hexadecimal digits, with colons between)")
    return Pin(match["workspace"], Head(int(match["sequence"]), match["hash"]))


def read_pins(path: str) -> list[Pin]:
    """Every pin a file keeps, as audit head writes them: its lines (`…: head PIN (…)`),
    its --json lines (each workspace's "pin"), or a pin alone on a line. Nothing else on
    a line is read as one (a stored name that looks like a pin is not)."""
    import json

    def pins_in(line: str) -> list[str]:
        text = line.strip()
        if text.startswith("{"):
            try:
                found = json.loads(text)
            except ValueError:
                return []
            listed = found.get("workspaces") if isinstance(found, dict) else None
            return [w.get("pin") for w in listed if isinstance(w, dict)] if isinstance(listed, list) else []
        marked = re.search(r": head (\S+) \([^()]*\)(?:; [0-9]+ events not yet chained)?$", text)
        return [marked[1] if marked else text]

    try:
        with open(path, encoding="utf-8", errors="replace") as kept:
            texts = [text for line in kept for text in pins_in(line) if isinstance(text, str)]
    except OSError as exc:
        raise AdminError(EXIT_USAGE, f"cannot read pinned heads from {quote(path)}: {exc.strerror}") from None
    found = []
    for text in texts:
        with contextlib.suppress(argparse.ArgumentTypeError):
            pin = parse_pin(text)
            if pin.workspace:
                found.append(pin)
    return found


class Position(collections.namedtuple("Position", "workspace sequence")):
    """Where an export stopped: a workspace's public id (None: the one listed) and the
    last sequence number shipped."""

    __slots__ = ()

    def __str__(self) -> str:
        return f"{self.workspace}:{self.sequence}" if self.workspace else str(self.sequence)


def parse_position(value: str) -> Position:
    """audit --after-sequence [WORKSPACE:]N."""
    match = re.fullmatch(r"(?:(?P<workspace>[0-9A-Za-z]{12}):)?(?P<sequence>[0-9]{1,18})", value.strip()) \
        if value.isascii() else None
    if match is None:
        raise argparse.ArgumentTypeError("must be a sequence number, or WORKSPACE:SEQUENCE as a previous page's "
                                         "`more:` note gives it")
    return Position(match["workspace"], int(match["sequence"]))


def chain_field(value: str | None) -> bytes:
    """One field of the encoding: its UTF-8 length in bytes, ':', the bytes, ','; NULL is '-,'."""
    if value is None:
        return b"-,"
    data = value.encode("utf-8")
    return b"%d:%s," % (len(data), data)


def chain_time(moment: datetime) -> str:
    """A time as the encoding writes it: YYYY-MM-DDTHH:MM:SS.ffffffZ, the year in four
    digits (strftime would write year 999 as 999, where PostgreSQL writes 0999)."""
    return moment.isoformat(timespec="microseconds") + "Z"


def chain_hash(previous_hash: str, event: dict) -> str:
    """SHA-256, as hex, of the previous event's hash (32 bytes) followed by this event's
    encoding: v2 for an event that records its login, else v1."""
    import hashlib

    login = event.get("login")
    fields = (
        CHAIN_ENCODING if login is None else CHAIN_ENCODING_LOGIN,
        str(event["sequence"]),
        event["workspacePublicId"],
        event["publicId"],
        event["action"],
        event["identityPublicId"],
        event["identitySlug"],
        event["tokenPublicId"],
        None if event["actorUserUuid"] is None else str(event["actorUserUuid"]),
        event["actorEmail"],
        event["reason"],
        event["metadata"],  # the jsonb's text, as PostgreSQL writes it
        chain_time(event["createdAt"]),
        *(() if login is None else (login,)),
    )
    return hashlib.sha256(bytes.fromhex(previous_hash) + b"".join(map(chain_field, fields))).hexdigest()


# Every way a chain can break, as audit verify names it (docs/schema.md).
CHAIN_BREAKS = {
    "gap": "a sequence number is missing (an event was deleted)",
    "changed": "an event does not hash to its recorded hash, or (when the next event no longer links to it) was "
               "rewritten with its hash recomputed",
    "inserted": "an event sits between two that linked to each other, or two share a sequence",
    "reordered": "events swapped places (their links or times say so)",
    "unchained": "an event has no place in the chain (written past the trigger)",
    "head_mismatch": "the event at a pinned sequence is not the pinned one, or the chain ends before it",
    "backdated": "an event is dated before the event before it, or after the time it was checked",
    "impossible": "an event undoes an end (a revoked identity changed, a revoked token issued or graced again) or "
                  "issues something twice",
    "mismatch": "the tables say otherwise than the chain's latest event about an identity or token",
}


def check_chain(events, expect: tuple[Head, ...] = (), now: datetime | None = None, resume: bool = False) -> dict:
    """Walk a workspace's events in sequence order (an iterable, read as it goes) and
    report every break (CHAIN_BREAKS) in order: after each, the walk goes on from the
    hashes the events record. Each pinned head (expect) is checked on its own; times
    never run backwards, nor past now. With resume (an export starting part-way), the
    first event is taken as it links. Returns how many chained events were checked, the
    head (SEQUENCE:HASH), whether the chain is intact, its first break and all of them."""
    accepted, before_previous, expected = {CHAIN_START}, None, 1  # accepted: what the next may link to
    previous, checked, head, skip, trusted = None, 0, None, False, None  # trusted: the last whole event's time
    logged = False  # whether an event before records its login (from 0.5.0 on, every one does)
    pinned: dict[int, list[Head]] = {}  # every pin at each sequence: two that differ cannot both hold
    for pin in expect:
        pinned.setdefault(pin.sequence, []).append(pin)
    breaks: list[dict] = []

    def broken(kind: str, sequence: int | None, event: dict | None, message: str) -> None:
        breaks.append({"kind": kind, "sequence": sequence, "eventPublicId": event and event["publicId"],
                       "message": message})

    events = iter(events)
    event = next(events, None)
    while event is not None:
        following = next(events, None)
        sequence = event["sequence"]
        if sequence is None:
            broken("unchained", None, event, f"event {event['publicId']} has no place in the chain: it was "
                                             "written past the chain's trigger")
        elif sequence < expected:
            broken("inserted", sequence, event, f"two events have sequence {sequence}")
        else:
            if resume and previous is None and sequence > 1:  # an export from part-way: taken as it links
                accepted, expected = {event["previousHash"]}, sequence
            # A reordered pair is named once, at its first event: its partner is not checked again.
            partner, skip, found = skip, False, len(breaks)
            checked += 1
            if sequence > expected:
                missing = str(expected) if sequence == expected + 1 else f"{expected} to {sequence - 1}"
                broken("gap", expected, event, f"event {missing} is missing: the chain goes from {expected - 1} "
                                               f"to {sequence}")
            elif not partner and event["previousHash"] not in accepted:
                kind, at, about, message = misliked(event, previous, following, before_previous)
                broken(kind, at, about, message)
                skip = kind == "reordered"
            if not (partner or skip) and chain_hash(event["previousHash"], event) != event["hash"]:
                out_of_order = (previous is not None and event["createdAt"] < previous["createdAt"]) or \
                    (following is not None and following["sequence"] is not None
                     and event["createdAt"] > following["createdAt"])
                # An event the next one still links to was changed where it stands, unless their times swapped.
                if out_of_order and (following is None or following["previousHash"] != event["hash"]
                                     or times_swapped(event, following)):
                    broken("reordered", sequence, event,
                           f"event {sequence} is out of order: its time does not fall between its neighbours'")
                    skip = True
                else:
                    broken("changed", sequence, event, f"event {sequence} was changed: it no longer hashes to its "
                                                       "recorded hash")
            if event.get("login") is None and logged and len(breaks) == found:  # v2 made v1, and re-hashed
                broken("changed", sequence, event, f"event {sequence} records no login, though an event before it "
                                                   "does: its login was taken away")
            logged = logged or event.get("login") is not None
            if len(breaks) == found and not partner:  # whole and linked: is it where it says it is in time?
                late = misdated(event, trusted, now)
                trusted = trusted if late else event["createdAt"]
                if late:
                    broken("backdated", sequence, event, late)
            for pin in pinned.pop(sequence, ()):
                if event["hash"] != pin.hash:
                    broken("head_mismatch", sequence, event, pinned_message(pin, f"event {sequence} is not the one "
                                                                                 "pinned"))
            # After a reordered pair, the next event may link to either of its two.
            accepted = {event["hash"], previous["hash"]} if partner else {event["hash"]}
            before_previous, previous = event["previousHash"], event
            expected, head = sequence + 1, str(Head(sequence, event["hash"]))
        event = following
    breaks += [unreached(pin, expected) for pins in pinned.values() for pin in pins]
    return {"events": checked, "head": head, "intact": not breaks, "break": breaks[0] if breaks else None,
            "breaks": breaks}


def misliked(event: dict, previous: dict | None, following: dict | None, before_previous: str | None) -> tuple:
    """The break of an event that does not link to the one before it: (kind, at which
    sequence, which event, what happened)."""
    sequence = event["sequence"]
    if previous is None:
        return ("changed", sequence, event, f"event {sequence} begins the chain, yet links to a hash: events before "
                                            "it were removed, or it was changed")
    if event["previousHash"] == before_previous:
        return ("inserted", sequence - 1, previous,
                f"event {sequence - 1} was inserted: event {sequence} links to the event before it")
    if following is not None and following["hash"] == event["previousHash"]:
        return ("reordered", sequence, event, f"events {sequence} and {sequence + 1} swapped places: {sequence} "
                                              f"links to {sequence + 1}")
    return ("changed", sequence - 1, previous, f"event {sequence - 1} was changed and its hash recomputed: event "
                                               f"{sequence} links to a hash it no longer has")


def times_swapped(event: dict, following: dict) -> bool:
    """Whether an event would hash to its recorded hash with the next event's time."""
    return chain_hash(event["previousHash"], {**event, "createdAt": following["createdAt"]}) == event["hash"]


# How far past the reading transaction's start an event may be dated and still not be "after
# the time it was checked": one that committed in the instant between that start and the
# snapshot the read took.
CLOCK_SLACK = timedelta(seconds=1)


def misdated(event: dict, after: datetime | None, now: datetime | None) -> str | None:
    """Why a whole event's time cannot be when it was written: before after (the time of
    the last whole event before it), or past now (when the chain is checked)."""
    when = chain_time(event["createdAt"])
    if after is not None and event["createdAt"] < after:
        return f"event {event['sequence']} is dated {when}, before the event before it"
    if now is not None and event["createdAt"] > now:
        return f"event {event['sequence']} is dated {when}, after the time it was checked"
    return None


def unreached(pin: Head, expected: int) -> dict:
    """The break of a pin the walk never reached: the chain ended, or skipped it."""
    what = (f"the chain ends at {expected - 1}, before the pinned head" if expected <= pin.sequence
            else f"event {pin.sequence} is missing")
    return {"kind": "head_mismatch", "sequence": pin.sequence, "eventPublicId": None,
            "message": pinned_message(pin, what)}


def pinned_message(expect: Head, what: str) -> str:
    return (f"{what} ({expect}): the log was rewritten at or before event {expect.sequence}, or events were removed "
            "from its end; no event up to it can be trusted unless an earlier export matches it")


# What each action makes of an identity's status.
STATUS_AFTER = {"identity.created": "active", "identity.paused": "paused", "identity.resumed": "active",
                "identity.revoked": "revoked"}


class ChainState:
    """What a workspace's audit chain says of its identities and tokens, by the latest
    event about each, gathered as the chain is walked (memory grows with identities and
    tokens, never with events): each identity's status, and each token's identity,
    scopes, name, hash, expiry and revocation. An event that undoes an end — a revoked
    identity's later status event, a revoked token issued or graced again, anything
    issued twice — is a break of kind impossible (an event forged to make a change past
    the triggers look made). compare() then holds the tables to it."""

    def __init__(self):
        self.identities: dict[str, tuple[str, dict]] = {}
        self.tokens: dict[str, dict] = {}
        self.breaks: list[dict] = []
        self.compared: set[str] = set()  # the identities compare() held to the chain

    def watch(self, events):
        """The events, unchanged, each one noted as it goes by."""
        for event in events:
            if event["sequence"] is not None:
                self.note(event)
            yield event

    def impossible(self, said: dict, message: str) -> None:
        self.breaks.append({"kind": "impossible", "sequence": said["sequence"], "eventPublicId": said["eventPublicId"],
                            "message": f"event {said['sequence']} {message}"})

    def note(self, event: dict) -> None:
        import json

        action, identity = event["action"], event["identityPublicId"]
        said = {"sequence": event["sequence"], "eventPublicId": event["publicId"]}
        if action in STATUS_AFTER and identity:
            before, then = self.identities.get(identity, (None, None))
            if before == "revoked" or (action == "identity.created" and before is not None):
                self.impossible(said, f"{'creates' if before != 'revoked' else 'changes'} agent identity {identity}, "
                                      f"which event {then['sequence']} {'created' if before != 'revoked' else 'revoked'}")
            self.identities[identity] = (STATUS_AFTER[action], said)
        if action not in ("identity.created", "identity.token_rotated", "identity.revoked", "identity.token_revoked"):
            return
        metadata = json.loads(event["metadata"])
        issued = metadata.get("tokenPublicId") if action in ("identity.created", "identity.token_rotated") else None
        if issued:
            if issued in self.tokens:
                self.impossible(said, f"issues token {issued} again")
            self.tokens[issued] = {"issued": said, "identity": identity, "scopes": metadata.get("scopes"),
                                   "name": metadata.get("tokenName"), "digest": metadata.get("tokenHashDigest"),
                                   "expiresAt": metadata.get("expiresAt"), "revoked": None, "said": said}
        for public_id in metadata.get("revokedTokenPublicIds") or ():
            token = self.tokens.setdefault(public_id, {"issued": None})
            if token.get("revoked"):
                self.impossible(said, f"revokes token {public_id} again")
            token.update(revoked=said, said=said)
        for graced in metadata.get("gracedTokens") or ():
            token = self.tokens.setdefault(graced["publicId"], {"issued": None, "revoked": None})
            if token.get("revoked"):
                self.impossible(said, f"gives token {graced['publicId']} a grace after it was revoked")
            token.update(expiresAt=graced["expiresAt"], said=said)

    def compare(self, rows) -> list[dict]:
        """Breaks of kind mismatch for each identity or token (rows: identity, status,
        token, expiresAt, revokedAt, scopes, name, hashDigest; a row per token) the chain
        says otherwise of."""
        found = []

        def mismatch(said: dict | None, message: str) -> None:
            found.append({"kind": "mismatch", "sequence": said and said["sequence"],
                          "eventPublicId": said and said["eventPublicId"], "message": message})

        seen = self.compared
        for row in rows:
            identity, token = row["identity"], row["token"]
            if identity not in seen:
                seen.add(identity)
                status, said = self.identities.get(identity, (None, None))
                if status is None:
                    mismatch(None, f"agent identity {identity} has no event that created it")
                elif status != row["status"]:
                    mismatch(said, f"agent identity {identity} is {row['status']}, but event {said['sequence']} "
                                   f"made it {status}")
            if token is not None:
                self.compare_token(row, self.tokens.get(token), mismatch)
        return found

    @staticmethod
    def compare_token(row: dict, chain: dict | None, mismatch) -> None:
        token = row["token"]
        if chain is None or chain["issued"] is None:
            mismatch(chain and chain["said"], f"token {token} has no event that issued it")
            return
        issued = chain["issued"]["sequence"]
        recorded = {"identity": (row["identity"], chain["identity"]), "scopes": (list(row["scopes"]), chain["scopes"]),
                    "name": (row["name"], chain["name"]), "hash": (row["hashDigest"], chain["digest"])}
        for what, (table, event) in recorded.items():
            if event is not None and table != event:  # (0.3.0's events record no hash digest)
                mismatch(chain["issued"], f"token {token}'s {what} is not the one event {issued} issued it with")
        if row["revokedAt"] is None and chain["revoked"]:
            mismatch(chain["revoked"], f"token {token} is not revoked, but event {chain['revoked']['sequence']} "
                                       "revoked it")
        elif row["revokedAt"] is not None and not chain["revoked"]:
            mismatch(chain["said"], f"token {token} is revoked, but no event revoked it")
        if iso(row["expiresAt"]) != chain["expiresAt"]:
            mismatch(chain["said"], f"token {token} expires {iso(row['expiresAt']) or 'never'}, but event "
                                    f"{chain['said']['sequence']} says {chain['expiresAt'] or 'never'}")


# --- Pure helpers: configuration and output values --------------------------


def database_url(args: argparse.Namespace) -> str:
    """--database-url, else DATABASE_URL, else POSTGRES_URL, else libpq's defaults."""
    for value in (args.database_url, os.environ.get("DATABASE_URL"), os.environ.get("POSTGRES_URL")):
        if value:
            return value
    return ""


def claimed_actor(args: argparse.Namespace) -> str | None:
    """--admin-user-email, else AGENT_IDENTITY_ADMIN_EMAIL, validated; None if neither is
    given (a proven login needs neither: actor_of decides)."""
    value = args.admin_user_email or os.environ.get("AGENT_IDENTITY_ADMIN_EMAIL")
    if not value:
        return None
    try:
        return parse_email(value)
    except argparse.ArgumentTypeError as exc:
        raise AdminError(EXIT_USAGE, f"admin user email {exc}") from None


def pinned_schema(args: argparse.Namespace) -> str | None:
    """The schema of Kan's tables when the operator named it (--db-schema, else
    AGENT_IDENTITY_DB_SCHEMA); None: found through the search_path, as Kan finds it."""
    return getattr(args, "db_schema", None) or os.environ.get("AGENT_IDENTITY_DB_SCHEMA") or None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libpq's run to several), or ''."""
    return (str(exc).strip().splitlines() or [""])[0]


# Where a password sits in a connection string: password=... in a libpq conninfo, and
# the password field of a URL (scheme://user:PASSWORD@host).
PASSWORD_RE = LazyPattern(r"""(?P<key>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s]+)|(?P<user>://[^:/@\s]*:)[^@\s]*(?=@)""",
                          re.IGNORECASE)


def redact(text: str) -> str:
    """A message with every password of a connection string in it masked (only there:
    a password is not a word to be blotted out wherever it happens to appear)."""
    return PASSWORD_RE.sub(lambda match: (match["key"] or match["user"]) + "***", text)


def scrub_tokens(message: str) -> str:
    """Blank out token-shaped text, and say why it matters. kan_agent_<12-character id>
    alone is how a token is named without its secret: left as it is."""
    spans = token_parts(message)
    if not spans:
        return message
    for start, end in reversed(spans):
        blanked = TOKEN_PREFIX + "***" if message[start:end].startswith(TOKEN_PREFIX) else "***"
        message = message[:start] + blanked + message[end:]
    return message + " (a token on the command line lands in shell history and the process list: rotate it)"


def visible(text: str) -> str:
    """One line of text safe to put on a terminal: every invisible character (escape
    sequences, OSC 8 links, newlines, carriage returns, bidirectional marks, zero-width
    and tag characters, undecodable bytes) shown as an escape instead of acted on. A
    value cannot start a line of its own: the output's lines are its own."""
    def escape(char: str) -> str:
        if not is_invisible(char):
            return char
        if unicodedata.category(char) == "Cs":  # surrogateescape keeps byte 0xNN as U+DCNN
            return f"\\x{ord(char) - 0xDC00:02x}"
        return char.encode("unicode_escape").decode("ascii")

    return "".join(map(escape, text))


def quote(value: str) -> str:
    """A value as it sits inside a sentence: in double quotes, with quotes, backslashes
    and control characters escaped, so that `bot" in workspace X: revoked` reads as
    one value."""
    return '"' + visible(value.replace("\\", "\\\\").replace('"', '\\"')) + '"'


# After a change is committed, what an operator should do when its output
# (or its token file) did not reach them.
COMMITTED_ADVICE = {
    "create": "the identity exists and its slug is taken: rotate it to get a token",
    "rotate": "the new token's hash is stored but the token is lost: rotate again to get one",
}


def undelivered(command: str, what: str, exc: BaseException) -> AdminError:
    """The error for a change that was committed but whose result did not reach the operator."""
    if isinstance(exc, KeyboardInterrupt):
        code, why = exit_code_of_interrupt(exc), "interrupted"
    elif isinstance(exc, BrokenPipeError):
        code, why = EXIT_BROKEN_PIPE, "the reader closed the pipe"
    elif isinstance(exc, OSError):
        code, why = EXIT_UNDELIVERED, exc.strerror or type(exc).__name__
    else:
        code, why = EXIT_UNDELIVERED, first_line(exc) or type(exc).__name__
    advice = COMMITTED_ADVICE.get(command, "inspect shows its state")
    return AdminError(code, f"the {command} was committed, but {what} ({why}); {advice}")


def relative(moment: datetime, now: datetime) -> str:
    """"in 12 days", "3 hours ago": the largest unit, counted to the nearest whole one, so
    that times cut to the second (as the output shows them) read the same as exact ones."""
    seconds = (moment - now).total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if abs(seconds) >= size:
            count = int(abs(seconds) / size + 0.5)
            text = f"{count} {unit}{'' if count == 1 else 's'}"
            break
    else:
        text = "less than a minute"
    return f"in {text}" if seconds > 0 else f"{text} ago"


def iso(moment: datetime | None) -> str | None:
    """UTC ISO 8601 with a Z; the database's timestamps hold UTC without a zone."""
    if moment is None:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.replace(microsecond=0).isoformat() + "Z"


def from_iso(text: str) -> datetime:
    """The inverse of iso(): a naive UTC datetime again."""
    return datetime.fromisoformat(text.removesuffix("Z"))


# --- Schema -----------------------------------------------------------------
#
# `agent-identity schema` prints this DDL; `doctor` holds a database to it. Tables and
# indexes are plain SQL; every function and trigger is a record below, from which both
# the DDL and doctor's expectations are made, so that what doctor checks is exactly what
# schema creates. {schema} is the schema that holds Kan's tables, quoted.

# Every function schema creates, and every statement the tool sends, resolves names in
# this path: the catalog, then (for relations only) temporary tables. The tables, types
# and functions of Kan and of this tool are always named with their schema, so nothing a
# role creates elsewhere — a temporary table, a planted operator — can stand in for them.
SAFE_SEARCH_PATH = "pg_catalog, pg_temp"

SCHEMA_TABLES_SQL = """\
DO $$ BEGIN
    CREATE TYPE {schema}.agent_identity_status AS ENUM ('active', 'paused', 'revoked');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

CREATE TABLE IF NOT EXISTS {schema}.agent_identity (
    "id" bigserial PRIMARY KEY,
    "publicId" varchar(12) NOT NULL,
    "workspaceId" bigint NOT NULL REFERENCES {schema}.workspace("id") ON DELETE CASCADE,
    "slug" varchar(64) NOT NULL,
    "displayName" varchar(255) NOT NULL,
    "status" {schema}.agent_identity_status NOT NULL DEFAULT 'active',
    "createdBy" uuid REFERENCES {schema}."user"("id") ON DELETE SET NULL,
    "createdAt" timestamp NOT NULL DEFAULT timezone('utc', now()),
    "updatedAt" timestamp,
    "pausedAt" timestamp,
    "revokedAt" timestamp,
    CONSTRAINT "agent_identity_publicId_unique" UNIQUE ("publicId"),
    -- a slug is never reused in a workspace, revoked identities included
    CONSTRAINT "agent_identity_workspace_slug_unique" UNIQUE ("workspaceId", "slug"),
    CONSTRAINT "agent_identity_slug_format" CHECK ("slug" ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$')
);
CREATE INDEX IF NOT EXISTS "agent_identity_workspace_created_idx"
    ON {schema}.agent_identity ("workspaceId", "createdAt" DESC, "id" DESC);
-- A workspace's identities by status (expiring's down ones, the counts of what was checked).
CREATE INDEX IF NOT EXISTS "agent_identity_workspace_status_idx" ON {schema}.agent_identity ("workspaceId", status);

CREATE TABLE IF NOT EXISTS {schema}.agent_token (
    "id" bigserial PRIMARY KEY,
    "publicId" varchar(12) NOT NULL,
    "agentIdentityId" bigint NOT NULL REFERENCES {schema}.agent_identity("id") ON DELETE CASCADE,
    "name" varchar(255) NOT NULL,
    "tokenHash" text NOT NULL,
    "scopes" text[] NOT NULL DEFAULT '{{}}',
    "expiresAt" timestamp,
    "lastUsedAt" timestamp,
    "createdBy" uuid REFERENCES {schema}."user"("id") ON DELETE SET NULL,
    "createdAt" timestamp NOT NULL DEFAULT timezone('utc', now()),
    "revokedAt" timestamp,
    "revokedBy" uuid REFERENCES {schema}."user"("id") ON DELETE SET NULL,
    "rotatedFromId" bigint REFERENCES {schema}.agent_token("id") ON DELETE SET NULL,
    CONSTRAINT "agent_token_publicId_unique" UNIQUE ("publicId")
);
CREATE INDEX IF NOT EXISTS "agent_token_identity_idx" ON {schema}.agent_token ("agentIdentityId", "id" DESC);
-- Live tokens by expiry: what expiring and list's warnings look for, a window at a time.
CREATE INDEX IF NOT EXISTS "agent_token_live_expiry_idx" ON {schema}.agent_token ("expiresAt")
    WHERE "revokedAt" IS NULL;

CREATE TABLE IF NOT EXISTS {schema}.agent_audit_event (
    "id" bigserial PRIMARY KEY,
    "publicId" varchar(12) NOT NULL,
    "workspaceId" bigint NOT NULL REFERENCES {schema}.workspace("id") ON DELETE CASCADE,
    "agentIdentityId" bigint REFERENCES {schema}.agent_identity("id") ON DELETE SET NULL,
    "agentTokenId" bigint REFERENCES {schema}.agent_token("id") ON DELETE SET NULL,
    "action" varchar(64) NOT NULL,
    "actorUserId" uuid REFERENCES {schema}."user"("id") ON DELETE SET NULL,
    "actorEmail" varchar(255),
    "reason" text,
    "metadata" jsonb NOT NULL DEFAULT '{{}}'::jsonb,
    "createdAt" timestamp NOT NULL DEFAULT timezone('utc', now()),
    CONSTRAINT "agent_audit_event_publicId_unique" UNIQUE ("publicId")
);
CREATE INDEX IF NOT EXISTS "agent_audit_event_identity_created_idx"
    ON {schema}.agent_audit_event ("agentIdentityId", "createdAt" DESC, "id" DESC);
CREATE INDEX IF NOT EXISTS "agent_audit_event_workspace_created_idx"
    ON {schema}.agent_audit_event ("workspaceId", "createdAt" DESC, "id" DESC);
CREATE INDEX IF NOT EXISTS "agent_audit_event_token_created_idx"
    ON {schema}.agent_audit_event ("agentTokenId", "createdAt" DESC, "id" DESC);

-- On Kan's own workspace_members, which has no index on these columns: the
-- access check finds the actor's memberships in a workspace through it, so
-- it stays an index lookup however many members Kan has. Additive only.
CREATE INDEX IF NOT EXISTS "agent_identity_workspace_members_user_idx"
    ON {schema}.workspace_members ("userId", "workspaceId");

-- The audit chain (docs/schema.md, "The audit chain"): each event's sequence number in
-- its workspace, the hash of the event before it and its own, and stable copies of what
-- it is about (the public ids and names a cascade cannot change).
ALTER TABLE {schema}.agent_audit_event
    ADD COLUMN IF NOT EXISTS "sequence" bigint,
    ADD COLUMN IF NOT EXISTS "workspacePublicId" varchar(12),
    ADD COLUMN IF NOT EXISTS "identityPublicId" varchar(12),
    ADD COLUMN IF NOT EXISTS "identitySlug" varchar(64),
    ADD COLUMN IF NOT EXISTS "tokenPublicId" varchar(12),
    ADD COLUMN IF NOT EXISTS "actorUserUuid" uuid,
    ADD COLUMN IF NOT EXISTS "previousHash" varchar(64),
    ADD COLUMN IF NOT EXISTS "hash" varchar(64);
-- The chain's order, and its head (the highest sequence) by index at any size; and
-- the events not (yet) in it, which the chain's index leaves out.
CREATE UNIQUE INDEX IF NOT EXISTS "agent_audit_event_workspace_sequence_idx"
    ON {schema}.agent_audit_event ("workspaceId", "sequence") WHERE "sequence" IS NOT NULL;
CREATE INDEX IF NOT EXISTS "agent_audit_event_unchained_idx"
    ON {schema}.agent_audit_event ("workspaceId", "id") WHERE "sequence" IS NULL;
-- An identity's or a token's events by the names the chain keeps, which a cascade
-- cannot detach: inspect, audit --slug and audit --token read them so.
CREATE INDEX IF NOT EXISTS "agent_audit_event_identity_public_idx"
    ON {schema}.agent_audit_event ("identityPublicId", "createdAt" DESC, "id" DESC);
CREATE INDEX IF NOT EXISTS "agent_audit_event_token_public_idx"
    ON {schema}.agent_audit_event ("tokenPublicId", "createdAt" DESC, "id" DESC);

-- When each token was last used, as the Kan server stamps it (agent_token_stamp): in a
-- row of its own, so that a stamp, even in a transaction the server keeps open, locks
-- nothing the tool changes (it holds only a key share of the token's row, which a
-- revocation does not wait for). agent_token."lastUsedAt" keeps what servers before
-- version 0.4.0 wrote there.
CREATE TABLE IF NOT EXISTS {schema}.agent_token_use (
    "agentTokenId" bigint PRIMARY KEY REFERENCES {schema}.agent_token("id") ON DELETE CASCADE,
    "lastUsedAt" timestamp NOT NULL
        CONSTRAINT "agent_token_use_time" CHECK ("lastUsedAt" >= '0001-01-01' AND "lastUsedAt" < '10000-01-01')
);

-- One row per workspace that has been changed: its row lock is the workspace's turn.
-- Every change of the tool takes it first, and the chain's trigger with each event, so
-- that a workspace's writers (and its audit chain) take turns; only the functions below,
-- which run as the tables' owner, can lock it, so no other role can hold the tool up.
CREATE TABLE IF NOT EXISTS {schema}.agent_workspace_lock (
    "workspaceId" bigint PRIMARY KEY REFERENCES {schema}.workspace("id") ON DELETE CASCADE
);

-- Proven actors (docs/security.md): which Kan user each maintainer's own database login
-- is. Only the tables' owner maps (no role is granted anything on it); a mapping goes with
-- its Kan user, and a mapping to an email no Kan user has is refused (NOT NULL).
CREATE TABLE IF NOT EXISTS {schema}.agent_maintainer_login (
    "login" name PRIMARY KEY,
    "userId" uuid NOT NULL REFERENCES {schema}."user"("id") ON DELETE CASCADE
);
-- The database login that wrote each event (its session_user), in the chain (encoding
-- v2); NULL in the events written before version 0.5.0, which keep encoding v1.
ALTER TABLE {schema}.agent_audit_event ADD COLUMN IF NOT EXISTS "login" name;
-- A token's workspace: its identity's, copied as it is issued (agent_written_by) and never
-- changed, so that row level security admits a proven login to it by one test per
-- statement (a policy that looked the identity up would not see one made by the same
-- statement). Filled in for the tokens issued before version 0.5.0.
ALTER TABLE {schema}.agent_token ADD COLUMN IF NOT EXISTS "workspaceId" bigint;
UPDATE {schema}.agent_token t SET "workspaceId" = i."workspaceId"
FROM {schema}.agent_identity i WHERE i."id" = t."agentIdentityId" AND t."workspaceId" IS NULL;
ALTER TABLE {schema}.agent_token ALTER COLUMN "workspaceId" SET NOT NULL;
"""

BACKFILL_FUNCTIONS = ("agent_audit_field", "agent_audit_event_hash", "agent_audit_chain_head", "agent_audit_event_link")
# Events written before the chain existed join it when schema is applied, in the
# order they were written (time, then id), in each workspace whose chain has not
# begun: an upgrade. Applying schema again finds none. An unchained event in a
# chained workspace is left alone, for audit verify to report: only a writer that
# bypassed the chain's trigger leaves one.
SCHEMA_BACKFILL_SQL = """\
DO $$
DECLARE
    unchained bigint[];
    event {schema}.agent_audit_event;
    chaining bigint;  -- the workspace whose chain is being built
    after_sequence bigint;
    after_hash varchar;
BEGIN
    IF EXISTS (SELECT 1 FROM {schema}.agent_audit_event WHERE "sequence" IS NULL) THEN
        LOCK TABLE {schema}.agent_audit_event IN SHARE ROW EXCLUSIVE MODE;  -- no writer meanwhile
        -- Decided once, before any event is linked (a test per event would read the
        -- links written so far, again and again).
        unchained := ARRAY(
            SELECT DISTINCT u."workspaceId" FROM {schema}.agent_audit_event u
            WHERE u."sequence" IS NULL
              AND NOT EXISTS (SELECT 1 FROM {schema}.agent_audit_event c
                              WHERE c."workspaceId" = u."workspaceId" AND c."sequence" IS NOT NULL));
        FOR event IN
            SELECT e.* FROM {schema}.agent_audit_event e
            WHERE e."sequence" IS NULL AND e."workspaceId" = ANY(unchained)
            ORDER BY e."workspaceId", e."createdAt", e."id"
        LOOP
            -- A workspace's chain starts at its first event; then each links to the one before.
            IF chaining IS NULL OR event."workspaceId" <> chaining THEN
                chaining := event."workspaceId";
                after_sequence := 0;
                after_hash := repeat('0', 64);
            END IF;
            event := {schema}.agent_audit_event_link(event, after_sequence, after_hash);
            after_sequence := event."sequence";
            after_hash := event."hash";
            UPDATE {schema}.agent_audit_event
            SET "sequence" = event."sequence", "workspacePublicId" = event."workspacePublicId",
                "identityPublicId" = event."identityPublicId", "identitySlug" = event."identitySlug",
                "tokenPublicId" = event."tokenPublicId", "actorUserUuid" = event."actorUserUuid",
                "previousHash" = event."previousHash", "hash" = event."hash"
            WHERE "id" = event."id";
        END LOOP;
    END IF;
END $$;
"""


class SchemaFunction(collections.namedtuple(
        "SchemaFunction", "name arguments signature returns language volatility definer private body")):
    """A function schema creates. signature is its argument types (how GRANT and doctor
    name it); definer runs it as its owner (the tables' owner), for a role that may not
    read or lock what it touches; private takes EXECUTE from PUBLIC (the role SQL of
    docs/security.md grants it to the roles that need it). Every one runs with
    SAFE_SEARCH_PATH, except the few SQL functions PostgreSQL must inline (a SET clause
    prevents inlining): those name every operator and function with its schema."""

    __slots__ = ()

    @property
    def inlined(self) -> bool:
        return self.language == "sql" and not self.definer and self.volatility != "VOLATILE"


class SchemaTrigger(collections.namedtuple("SchemaTrigger", "name table timing events columns function deferred")):
    """A trigger schema creates: FOR EACH ROW unless events is TRUNCATE; columns narrow
    an UPDATE (UPDATE OF ...); deferred makes it a constraint trigger checked at commit."""

    __slots__ = ()


SCHEMA_FUNCTIONS = (
    # One field of the chain's encoding: its length in UTF-8 bytes, ':', its text, ','; NULL is '-,'.
    SchemaFunction("agent_audit_field", "value text", "text", "text", "sql", "IMMUTABLE", False, False, """
    SELECT CASE WHEN value IS NULL THEN '-,'
                ELSE pg_catalog.octet_length(pg_catalog.convert_to(value, 'UTF8'))::pg_catalog.text
                     OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) value OPERATOR(pg_catalog.||) ',' END
"""),
    # An event's hash, as hex: SHA-256 of the previous hash's 32 bytes, then the encoding:
    # v2, which ends with the login that wrote the event, or (written before there was one) v1.
    SchemaFunction("agent_audit_event_hash", "e {schema}.agent_audit_event", "{schema}.agent_audit_event",
                   "character varying", "sql", "STABLE", False, False, """
    SELECT pg_catalog.encode(pg_catalog.sha256(pg_catalog.decode(e."previousHash", 'hex') OPERATOR(pg_catalog.||)
        pg_catalog.convert_to(
            {schema}.agent_audit_field(CASE WHEN e.login IS NULL THEN 'agent-identity audit v1'
                                            ELSE 'agent-identity audit v2' END::pg_catalog.text)
            OPERATOR(pg_catalog.||) {schema}.agent_audit_field(e."sequence"::pg_catalog.text)
            OPERATOR(pg_catalog.||) {schema}.agent_audit_field(e."workspacePublicId"::pg_catalog.text)
            OPERATOR(pg_catalog.||) {schema}.agent_audit_field(e."publicId"::pg_catalog.text)
            OPERATOR(pg_catalog.||) {schema}.agent_audit_field(e.action::pg_catalog.text)
            OPERATOR(pg_catalog.||) {schema}.agent_audit_field(e."identityPublicId"::pg_catalog.text)
            OPERATOR(pg_catalog.||) {schema}.agent_audit_field(e."identitySlug"::pg_catalog.text)
            OPERATOR(pg_catalog.||) {schema}.agent_audit_field(e."tokenPublicId"::pg_catalog.text)
            OPERATOR(pg_catalog.||) {schema}.agent_audit_field(e."actorUserUuid"::pg_catalog.text)
            OPERATOR(pg_catalog.||) {schema}.agent_audit_field(e."actorEmail"::pg_catalog.text)
            OPERATOR(pg_catalog.||) {schema}.agent_audit_field(e.reason)
            OPERATOR(pg_catalog.||) {schema}.agent_audit_field(e.metadata::pg_catalog.text)
            OPERATOR(pg_catalog.||) {schema}.agent_audit_field(
                pg_catalog.to_char(e."createdAt", 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
            OPERATOR(pg_catalog.||) CASE WHEN e.login IS NULL THEN ''::pg_catalog.text
                                         ELSE {schema}.agent_audit_field(e.login::pg_catalog.text) END,
            'UTF8')), 'hex')::pg_catalog.varchar
"""),
    # A workspace's chain head: its event with the highest sequence, through the unique
    # index (inlined, so its plan shows in the caller's).
    SchemaFunction("agent_audit_chain_head", "workspace_id bigint", "bigint",
                   'TABLE("sequence" bigint, hash character varying, "createdAt" timestamp without time zone)',
                   "sql", "STABLE", False, False, """
    SELECT h."sequence", h."hash", h."createdAt"
    FROM {schema}.agent_audit_event h
    WHERE h."workspaceId" OPERATOR(pg_catalog.=) workspace_id AND h."sequence" IS NOT NULL
    ORDER BY h."sequence" DESC
    LIMIT 1
"""),
    # An event made the link after (after_sequence, after_hash) of its workspace's chain:
    # the names of what it is about, its sequence number and its hashes.
    SchemaFunction("agent_audit_event_link",
                   "e {schema}.agent_audit_event, after_sequence bigint, after_hash character varying",
                   "{schema}.agent_audit_event, bigint, character varying", "{schema}.agent_audit_event",
                   "plpgsql", "VOLATILE", False, False, """
BEGIN
    SELECT w."publicId", i."publicId", i.slug, t."publicId"
    INTO e."workspacePublicId", e."identityPublicId", e."identitySlug", e."tokenPublicId"
    FROM (SELECT) AS one
    LEFT JOIN {schema}.workspace w ON w."id" = e."workspaceId"
    LEFT JOIN {schema}.agent_identity i ON i."id" = e."agentIdentityId"
    LEFT JOIN {schema}.agent_token t ON t."id" = e."agentTokenId";
    e."actorUserUuid" := e."actorUserId";
    e."sequence" := after_sequence + 1;
    e."previousHash" := after_hash;
    e."hash" := {schema}.agent_audit_event_hash(e);
    RETURN e;
END
"""),
    # Kan's rule, once: the workspaces this Kan user may manage now. On an active membership
    # there, an override of workspace:manage decides; else a custom role of that workspace
    # must grant it; else only the legacy admin role does — and an explicit deny on any
    # of their active memberships there wins (Kan's hasPermission). The access check of
    # every command runs it, and review asks it of each identity's maker.
    SchemaFunction("agent_managed_workspaces", "user_id uuid", "uuid", "SETOF bigint", "sql", "STABLE", False, False,
                   """
    SELECT m."workspaceId"
    FROM {schema}.workspace_members m
    LEFT JOIN {schema}.workspace_member_permissions o
        ON o."workspaceMemberId" OPERATOR(pg_catalog.=) m."id"
       AND o.permission::pg_catalog.text OPERATOR(pg_catalog.=) 'workspace:manage'
    WHERE m."userId" OPERATOR(pg_catalog.=) user_id
      AND m.status::pg_catalog.text OPERATOR(pg_catalog.=) 'active' AND m."deletedAt" IS NULL
      AND CASE WHEN o."workspaceMemberId" IS NOT NULL THEN o.granted
               WHEN m."roleId" IS NOT NULL THEN EXISTS (
                   SELECT FROM {schema}.workspace_roles r
                   JOIN {schema}.workspace_role_permissions g ON g."workspaceRoleId" OPERATOR(pg_catalog.=) r."id"
                   WHERE r."id" OPERATOR(pg_catalog.=) m."roleId"
                     AND r."workspaceId" OPERATOR(pg_catalog.=) m."workspaceId"
                     AND g.permission::pg_catalog.text OPERATOR(pg_catalog.=) 'workspace:manage' AND g.granted)
               ELSE m.role::pg_catalog.text OPERATOR(pg_catalog.=) 'admin' END
      AND NOT EXISTS (
          SELECT FROM {schema}.workspace_members d
          JOIN {schema}.workspace_member_permissions od ON od."workspaceMemberId" OPERATOR(pg_catalog.=) d."id"
          WHERE d."userId" OPERATOR(pg_catalog.=) user_id AND d."workspaceId" OPERATOR(pg_catalog.=) m."workspaceId"
            AND d.status::pg_catalog.text OPERATOR(pg_catalog.=) 'active' AND d."deletedAt" IS NULL
            AND od.permission::pg_catalog.text OPERATOR(pg_catalog.=) 'workspace:manage' AND NOT od.granted)
    GROUP BY m."workspaceId"
"""),
    # A time the tool can stand behind: finite, and within the years 1 to 9999 (what
    # every reader of these tables can hold: Python's datetime, JavaScript's Date).
    SchemaFunction("agent_time_ok", "t timestamp without time zone", "timestamp without time zone", "boolean", "sql",
                   "IMMUTABLE", False, False, """
    SELECT t IS NULL OR t OPERATOR(pg_catalog.>=) '0001-01-01'::pg_catalog.timestamp
                        AND t OPERATOR(pg_catalog.<) '10000-01-01'::pg_catalog.timestamp
"""),
    # Proven actors (docs/security.md). Who this session's login is: whether the tables'
    # owner mapped it, to which Kan user (a mapping goes with its user), and whether it
    # has the privileges of a group that the maintainers' policies admit (a policy of
    # agent_identity's that asks agent_login_workspaces) — which a superuser, BYPASSRLS
    # login or member of the tables' owner, past row level security, never is. A session
    # mapped or in the group is bound: the database writes its actor, and it takes no
    # turn of a workspace its user may not manage. The mapping follows session_user:
    # SET ROLE changes nothing.
    SchemaFunction("agent_session_login", "", "", 'TABLE(login name, mapped boolean, "userId" uuid, email text, '
                   '"inGroup" boolean)', "sql", "STABLE", True, False, """
    SELECT session_user, m.login IS NOT NULL, u."id", u.email::text,
           NOT EXISTS (SELECT FROM pg_roles r WHERE r.rolname = session_user AND (r.rolsuper OR r.rolbypassrls))
           AND NOT pg_has_role(session_user, (SELECT c.relowner FROM pg_class c
                                              WHERE c.oid = '{schema}.agent_identity'::regclass), 'USAGE')
           AND EXISTS (SELECT FROM pg_policy p
                       WHERE p.polrelid = '{schema}.agent_identity'::regclass
                         AND pg_get_expr(p.polqual, p.polrelid) LIKE '%agent_login_workspaces()%'
                         AND EXISTS (SELECT FROM unnest(p.polroles) AS r(role)
                                     WHERE r.role <> 0 AND pg_has_role(session_user, r.role, 'USAGE')))
    FROM (SELECT) AS one
    LEFT JOIN {schema}.agent_maintainer_login m ON m."login" = session_user
    LEFT JOIN {schema}."user" u ON u."id" = m."userId"
"""),
    # The workspaces this session's login may manage now, by Kan's rule (none for a login
    # nobody mapped): what the maintainers' row level security policies admit, asked once
    # per statement.
    SchemaFunction("agent_login_workspaces", "", "", "SETOF bigint", "sql", "STABLE", True, True, """
    SELECT managed
    FROM {schema}.agent_maintainer_login m, {schema}.agent_managed_workspaces(m."userId") AS managed
    WHERE m.login = session_user
"""),
    # Take the workspace's turn until the transaction ends: only the functions here do.
    SchemaFunction("agent_workspace_turn", "workspace_id bigint", "bigint", "void", "plpgsql", "VOLATILE",
                   True, True, """
BEGIN
    INSERT INTO {schema}.agent_workspace_lock ("workspaceId") VALUES (workspace_id) ON CONFLICT DO NOTHING;
    PERFORM 1 FROM {schema}.agent_workspace_lock l WHERE l."workspaceId" = workspace_id FOR UPDATE;
END
"""),
    # Take the workspace's turn (every change of the tool does, first), and say how far its
    # chain had come once the turn was ours: a change that read the workspace before
    # waiting compares it with what it read. A proven login takes no turn of (and learns
    # nothing of) a workspace it may not manage: NULL. (Nor does a login of the group that
    # nobody mapped: it manages none.)
    SchemaFunction("agent_lock_workspace", "workspace_id bigint", "bigint", "bigint", "plpgsql", "VOLATILE",
                   True, True, """
BEGIN
    IF EXISTS (SELECT FROM {schema}.agent_session_login() AS s WHERE s.mapped OR s."inGroup")
       AND NOT EXISTS (SELECT FROM {schema}.agent_login_workspaces() AS w(managed) WHERE w.managed = workspace_id) THEN
        RETURN NULL;
    END IF;
    PERFORM {schema}.agent_workspace_turn(workspace_id);
    RETURN coalesce((SELECT h."sequence" FROM {schema}.agent_audit_chain_head(workspace_id) h), 0);
END
"""),
    # Link each new event, in the statement that writes it, whoever writes it. The
    # workspace's turn first, so each writer reads the head the one before it left; the
    # time is the database's (never earlier than the head's, so times never run backwards
    # along a chain). An event about an identity or token of another workspace is refused.
    # One exception: the tables' owner restoring a backup (pg_restore --data-only with the
    # triggers on) brings events already linked, and those that hash to what they say are
    # kept as they are, so a restore gives back the same chain; a restore takes no turn
    # (the turns' own table is restored with the rest). A head whose time the tool cannot
    # stand behind (infinite, or over a day ahead: written past the safeguards) is not
    # followed: the next event is dated now, and audit verify names the head. Every event
    # records the login that wrote it; a bound login's actor is its mapped Kan user (or
    # none), whatever the statement said.
    SchemaFunction("agent_audit_event_chain", "", "", "trigger", "plpgsql", "VOLATILE", True, False, """
DECLARE
    head record;
    who record;
BEGIN
    SELECT * INTO who FROM {schema}.agent_session_login();
    IF who.mapped OR who."inGroup" THEN  -- bound: the mapped user (none, unmapped) is the actor
        NEW."actorUserId" := who."userId";
        NEW."actorEmail" := who.email;
        -- Its refusal in a workspace it may not manage names nothing there (it would read it back).
        IF NOT EXISTS (SELECT FROM {schema}.agent_login_workspaces() AS w(managed)
                       WHERE w.managed = NEW."workspaceId") THEN
            NEW."agentIdentityId" := NULL;
            NEW."agentTokenId" := NULL;
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM {schema}.agent_identity i
               WHERE i."id" = NEW."agentIdentityId" AND i."workspaceId" <> NEW."workspaceId")
       OR EXISTS (SELECT 1 FROM {schema}.agent_token t JOIN {schema}.agent_identity i ON i."id" = t."agentIdentityId"
                  WHERE t."id" = NEW."agentTokenId" AND i."workspaceId" <> NEW."workspaceId") THEN
        RAISE EXCEPTION 'audit event % is about an identity or token of another workspace', NEW."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW."sequence" IS NOT NULL AND NEW."previousHash" IS NOT NULL AND NEW."hash" IS NOT NULL
       AND {schema}.agent_time_ok(NEW."createdAt")
       AND pg_has_role(session_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = TG_RELID), 'USAGE')
       AND {schema}.agent_audit_event_hash(NEW) = NEW."hash" THEN
        RETURN NEW;
    END IF;
    NEW.login := session_user;
    PERFORM {schema}.agent_workspace_turn(NEW."workspaceId");
    SELECT * INTO head FROM {schema}.agent_audit_chain_head(NEW."workspaceId");
    NEW."createdAt" := GREATEST(timezone('UTC', now()),
                                CASE WHEN {schema}.agent_time_ok(head."createdAt")
                                          AND head."createdAt" <= timezone('UTC', now()) + interval '1 day'
                                     THEN head."createdAt" END);
    RETURN {schema}.agent_audit_event_link(NEW, coalesce(head."sequence", 0), coalesce(head."hash", repeat('0', 64)));
END
"""),
    # Append-only, for every role, the owner included. What may still happen: Kan
    # hard-deleting a workspace deletes its events; a deleted identity, token or user
    # leaves NULL in the event's foreign key (only once the row is gone: the chain keeps
    # their ids in columns of its own); and the backfill chains an event written before
    # the chain, once.
    SchemaFunction("agent_audit_event_append_only", "", "", "trigger", "plpgsql", "VOLATILE", True, False, """
DECLARE
    cascades text[] := ARRAY['agentIdentityId', 'agentTokenId', 'actorUserId'];
    chain text[] := ARRAY['sequence', 'workspacePublicId', 'identityPublicId', 'identitySlug', 'tokenPublicId',
                          'actorUserUuid', 'previousHash', 'hash'];
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF NOT EXISTS (SELECT 1 FROM {schema}.workspace w WHERE w."id" = OLD."workspaceId") THEN
            RETURN OLD;  -- its workspace is being deleted
        END IF;
        RAISE EXCEPTION 'agent_audit_event is append-only: audit event % may not be deleted', OLD."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    IF to_jsonb(NEW) - cascades = to_jsonb(OLD) - cascades
       AND (NEW."agentIdentityId" IS NOT DISTINCT FROM OLD."agentIdentityId"
            OR NEW."agentIdentityId" IS NULL
               AND NOT EXISTS (SELECT 1 FROM {schema}.agent_identity i WHERE i."id" = OLD."agentIdentityId"))
       AND (NEW."agentTokenId" IS NOT DISTINCT FROM OLD."agentTokenId"
            OR NEW."agentTokenId" IS NULL
               AND NOT EXISTS (SELECT 1 FROM {schema}.agent_token t WHERE t."id" = OLD."agentTokenId"))
       AND (NEW."actorUserId" IS NOT DISTINCT FROM OLD."actorUserId"
            OR NEW."actorUserId" IS NULL
               AND NOT EXISTS (SELECT 1 FROM {schema}."user" u WHERE u."id" = OLD."actorUserId")) THEN
        RETURN NEW;
    END IF;
    IF OLD."sequence" IS NULL AND to_jsonb(NEW) - chain = to_jsonb(OLD) - chain THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'agent_audit_event is append-only: audit event % may not be changed', OLD."publicId"
        USING ERRCODE = 'check_violation';
END
"""),
    SchemaFunction("agent_audit_event_no_truncate", "", "", "trigger", "plpgsql", "VOLATILE", False, False, """
BEGIN
    RAISE EXCEPTION 'agent_audit_event is append-only: it may not be truncated' USING ERRCODE = 'check_violation';
END
"""),
    # What ends stays ended, for every role, the owner included: a revoked token is never
    # un-revoked and its expiry only moves earlier; a revoked identity stays revoked. And
    # what a token or an identity is never changes at all: only its end, its status and
    # the times that go with them (and, where a cascade empties one, a foreign key whose
    # row is gone).
    SchemaFunction("agent_token_only_ends", "", "", "trigger", "plpgsql", "VOLATILE", False, False, """
BEGIN
    IF NEW."id" IS DISTINCT FROM OLD."id" OR NEW."publicId" IS DISTINCT FROM OLD."publicId"
       OR NEW."agentIdentityId" IS DISTINCT FROM OLD."agentIdentityId" OR NEW.name IS DISTINCT FROM OLD.name
       OR NEW."workspaceId" IS DISTINCT FROM OLD."workspaceId"
       OR NEW."tokenHash" IS DISTINCT FROM OLD."tokenHash" OR NEW.scopes IS DISTINCT FROM OLD.scopes
       OR NEW."createdAt" IS DISTINCT FROM OLD."createdAt"
       OR NEW."createdBy" IS DISTINCT FROM OLD."createdBy"
          AND NOT (NEW."createdBy" IS NULL AND NOT EXISTS (SELECT FROM {schema}."user" u WHERE u."id" = OLD."createdBy"))
       OR NEW."rotatedFromId" IS DISTINCT FROM OLD."rotatedFromId"
          AND NOT (NEW."rotatedFromId" IS NULL
                   AND NOT EXISTS (SELECT FROM {schema}.agent_token s WHERE s."id" = OLD."rotatedFromId"))
       OR NEW."revokedBy" IS DISTINCT FROM OLD."revokedBy" AND NEW."revokedAt" IS NOT DISTINCT FROM OLD."revokedAt"
          AND NOT (NEW."revokedBy" IS NULL AND NOT EXISTS (SELECT FROM {schema}."user" u WHERE u."id" = OLD."revokedBy"))
    THEN
        RAISE EXCEPTION 'token %: only its end may change (its revocation, an earlier expiry)', OLD."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    IF OLD."revokedAt" IS NOT NULL AND NEW."revokedAt" IS DISTINCT FROM OLD."revokedAt" THEN
        RAISE EXCEPTION 'token % is revoked, and revocation is final', OLD."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    IF OLD."expiresAt" IS NOT NULL AND (NEW."expiresAt" IS NULL OR NEW."expiresAt" > OLD."expiresAt") THEN
        RAISE EXCEPTION 'token % may not live longer than it was issued to', OLD."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
"""),
    SchemaFunction("agent_identity_revocation_is_final", "", "", "trigger", "plpgsql", "VOLATILE", False, False, """
BEGIN
    IF NEW."id" IS DISTINCT FROM OLD."id" OR NEW."publicId" IS DISTINCT FROM OLD."publicId"
       OR NEW."workspaceId" IS DISTINCT FROM OLD."workspaceId" OR NEW.slug IS DISTINCT FROM OLD.slug
       OR NEW."displayName" IS DISTINCT FROM OLD."displayName" OR NEW."createdAt" IS DISTINCT FROM OLD."createdAt"
       OR NEW."createdBy" IS DISTINCT FROM OLD."createdBy"
          AND NOT (NEW."createdBy" IS NULL AND NOT EXISTS (SELECT FROM {schema}."user" u WHERE u."id" = OLD."createdBy"))
       OR NEW."pausedAt" IS DISTINCT FROM OLD."pausedAt" AND NEW.status IS NOT DISTINCT FROM OLD.status
       OR NEW."revokedAt" IS DISTINCT FROM OLD."revokedAt" AND NEW.status::text <> 'revoked'
    THEN
        RAISE EXCEPTION 'agent identity %: only its status, and the times that go with it, may change',
            OLD."publicId" USING ERRCODE = 'check_violation';
    END IF;
    IF OLD.status::text = 'revoked'
       AND (NEW.status::text <> 'revoked' OR NEW."revokedAt" IS DISTINCT FROM OLD."revokedAt") THEN
        RAISE EXCEPTION 'agent identity % is revoked, and revocation is final', OLD."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
"""),
    # Time is the database's: no time is infinite, and a token expires after it was made.
    # Checked as a value is written (a row an earlier version let through stays readable
    # and revocable; doctor names it).
    SchemaFunction("agent_identity_times", "", "", "trigger", "plpgsql", "VOLATILE", False, False, """
BEGIN
    IF NEW."createdAt" IS DISTINCT FROM OLD."createdAt" AND NOT {schema}.agent_time_ok(NEW."createdAt")
       OR NEW."updatedAt" IS DISTINCT FROM OLD."updatedAt" AND NOT {schema}.agent_time_ok(NEW."updatedAt")
       OR NEW."pausedAt" IS DISTINCT FROM OLD."pausedAt" AND NOT {schema}.agent_time_ok(NEW."pausedAt")
       OR NEW."revokedAt" IS DISTINCT FROM OLD."revokedAt" AND NOT {schema}.agent_time_ok(NEW."revokedAt") THEN
        RAISE EXCEPTION 'agent identity %: its times must be finite, in the years 1 to 9999', NEW."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    -- A change is dated when it is made: the transaction's own time, which its event carries too.
    IF TG_OP = 'UPDATE' AND (NEW."updatedAt" IS DISTINCT FROM OLD."updatedAt"
                             AND (NEW."updatedAt" IS NULL OR NEW."updatedAt" <> timezone('utc', now()))
                             OR NEW."pausedAt" IS DISTINCT FROM OLD."pausedAt" AND NEW."pausedAt" IS NOT NULL
                             AND NEW."pausedAt" <> timezone('utc', now())
                             OR NEW."revokedAt" IS DISTINCT FROM OLD."revokedAt"
                             AND NEW."revokedAt" <> timezone('utc', now())) THEN
        RAISE EXCEPTION 'agent identity %: a change is dated when it is made (now), not another time',
            NEW."publicId" USING ERRCODE = 'check_violation';
    END IF;
    -- So is an identity made, but by the tables' owner restoring one (docs/schema.md).
    IF TG_OP = 'INSERT' AND NEW."createdAt" <> timezone('utc', now())
       AND NOT pg_has_role(session_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = TG_RELID), 'USAGE') THEN
        RAISE EXCEPTION 'agent identity %: a change is dated when it is made (now), not another time',
            NEW."publicId" USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
"""),
    SchemaFunction("agent_token_times", "", "", "trigger", "plpgsql", "VOLATILE", False, False, """
BEGIN
    IF NEW."lastUsedAt" IS DISTINCT FROM OLD."lastUsedAt" AND NOT {schema}.agent_time_ok(NEW."lastUsedAt")
       OR NEW."revokedAt" IS DISTINCT FROM OLD."revokedAt" AND NOT {schema}.agent_time_ok(NEW."revokedAt")
       OR NEW."createdAt" IS DISTINCT FROM OLD."createdAt" AND NOT {schema}.agent_time_ok(NEW."createdAt")
       OR (NEW."createdAt" IS DISTINCT FROM OLD."createdAt" OR NEW."expiresAt" IS DISTINCT FROM OLD."expiresAt")
          AND (NOT {schema}.agent_time_ok(NEW."expiresAt")
               OR {schema}.agent_time_ok(NEW."createdAt") AND NEW."expiresAt" <= NEW."createdAt") THEN
        RAISE EXCEPTION 'token %: its times must be finite, in the years 1 to 9999, and it must expire after it '
                        'was made', NEW."publicId" USING ERRCODE = 'check_violation';
    END IF;
    IF TG_OP = 'UPDATE' AND NEW."revokedAt" IS DISTINCT FROM OLD."revokedAt"
       AND NEW."revokedAt" <> timezone('utc', now()) THEN
        RAISE EXCEPTION 'token %: a revocation is dated when it is made (now), not another time', NEW."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    -- A token is issued now, unused, live, for at most a year (or, asked for, for ever): as
    -- the tool issues one; but by the tables' owner restoring one (docs/schema.md).
    IF TG_OP = 'INSERT'
       AND (NEW."createdAt" <> timezone('utc', now()) OR NEW."lastUsedAt" IS NOT NULL
            OR NEW."revokedAt" IS NOT NULL OR NEW."expiresAt" > timezone('utc', now()) + interval '365 days')
       AND NOT pg_has_role(session_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = TG_RELID), 'USAGE') THEN
        RAISE EXCEPTION 'token %: a token is issued now, unused and live, for at most 365 days', NEW."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
"""),
    # Who wrote, as the database knows it: a token is of its identity's workspace; and for a
    # bound login, the maker of an identity or token and the revoker of a token are its
    # mapped Kan user, whatever the statement said.
    SchemaFunction("agent_written_by", "", "", "trigger", "plpgsql", "VOLATILE", True, False, """
DECLARE
    who record;
BEGIN
    IF TG_TABLE_NAME = 'agent_token' AND TG_OP = 'INSERT' THEN
        NEW."workspaceId" := (SELECT i."workspaceId" FROM {schema}.agent_identity i WHERE i."id" = NEW."agentIdentityId");
    END IF;
    IF TG_OP = 'UPDATE' AND NEW."revokedAt" IS NOT DISTINCT FROM OLD."revokedAt" THEN
        RETURN NEW;  -- (an expiry brought forward: nobody's name goes with it)
    END IF;
    SELECT * INTO who FROM {schema}.agent_session_login();
    IF who.mapped OR who."inGroup" THEN
        IF TG_OP = 'INSERT' THEN
            NEW."createdBy" := who."userId";
        ELSE
            NEW."revokedBy" := who."userId";
        END IF;
    END IF;
    RETURN NEW;
END
"""),
    # No change without its event: at commit, every identity or token the transaction
    # made, every identity's new status and every token's revocation or new expiry needs
    # the audit event that records it, written by this same transaction. Kan's own
    # changes (the server's lastUsedAt, its cascades) touch none of these columns.
    SchemaFunction("agent_identity_audited", "", "", "trigger", "plpgsql", "VOLATILE", True, False, """
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status THEN
        RETURN NULL;
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM {schema}.agent_audit_event e
        WHERE e."agentIdentityId" = NEW."id" AND e.xmin = pg_current_xact_id()::xid
          AND e.action = CASE WHEN TG_OP = 'INSERT' THEN 'identity.created'
                              ELSE CASE NEW.status::text WHEN 'active' THEN 'identity.resumed'
                                                         WHEN 'paused' THEN 'identity.paused'
                                                         ELSE 'identity.revoked' END END) THEN
        RAISE EXCEPTION 'agent identity % was % without its audit event', NEW."publicId",
            CASE WHEN TG_OP = 'INSERT' THEN 'created' ELSE 'made ' || NEW.status::text END
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
"""),
    SchemaFunction("agent_token_audited", "", "", "trigger", "plpgsql", "VOLATILE", True, False, """
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NOT EXISTS (
            SELECT 1 FROM {schema}.agent_audit_event e
            WHERE e."agentTokenId" = NEW."id" AND e.xmin = pg_current_xact_id()::xid
              AND e.action IN ('identity.created', 'identity.token_rotated')) THEN
            RAISE EXCEPTION 'token % was issued without its audit event', NEW."publicId"
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NULL;
    END IF;
    IF NEW."revokedAt" IS DISTINCT FROM OLD."revokedAt" AND NOT EXISTS (
        SELECT 1 FROM {schema}.agent_audit_event e
        WHERE e."agentIdentityId" = NEW."agentIdentityId" AND e.xmin = pg_current_xact_id()::xid
          AND e.action IN ('identity.revoked', 'identity.token_revoked', 'identity.token_rotated')
          AND e.metadata -> 'revokedTokenPublicIds' ? NEW."publicId") THEN
        RAISE EXCEPTION 'token % had its revocation changed without its audit event', NEW."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW."expiresAt" IS DISTINCT FROM OLD."expiresAt" AND NOT EXISTS (
        SELECT 1 FROM {schema}.agent_audit_event e
        WHERE e."agentIdentityId" = NEW."agentIdentityId" AND e.xmin = pg_current_xact_id()::xid
          AND e.action = 'identity.token_rotated'
          AND e.metadata -> 'gracedTokens' @> jsonb_build_array(jsonb_build_object('publicId', NEW."publicId"))) THEN
        RAISE EXCEPTION 'token % had its expiry changed without its audit event', NEW."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
"""),
    # The Kan server's two needs, and all it may do with these tables (docs/tokens.md):
    # read what checking one token takes, and stamp that token's lastUsedAt.
    SchemaFunction("agent_token_for_verification", "token_public_id text", "text",
                   'TABLE("tokenHash" text, scopes text[], revoked boolean, expired boolean, '
                   '"identityPublicId" character varying, status text, "workspaceId" bigint, '
                   '"workspaceDeleted" boolean)',
                   "sql", "STABLE", True, True, """
    SELECT t."tokenHash", t.scopes, t."revokedAt" IS NOT NULL,
           t."expiresAt" IS NOT NULL AND t."expiresAt" <= timezone('UTC', now()),
           i."publicId", i.status::text, i."workspaceId", w."deletedAt" IS NOT NULL
    FROM {schema}.agent_token t
    JOIN {schema}.agent_identity i ON i."id" = t."agentIdentityId"
    JOIN {schema}.workspace w ON w."id" = i."workspaceId"
    WHERE t."publicId" = token_public_id
"""),
    # A stamp of a token a server just accepted: live, of an active identity, in a
    # workspace not deleted (a revoked token cannot be made to look used).
    SchemaFunction("agent_token_stamp", "token_public_id text", "text", "boolean", "sql", "VOLATILE", True, True, """
    WITH stamped AS (
        INSERT INTO {schema}.agent_token_use ("agentTokenId", "lastUsedAt")
        SELECT t."id", timezone('UTC', now())
        FROM {schema}.agent_token t
        JOIN {schema}.agent_identity i ON i."id" = t."agentIdentityId"
        JOIN {schema}.workspace w ON w."id" = i."workspaceId"
        WHERE t."publicId" = token_public_id AND t."revokedAt" IS NULL
          AND (t."expiresAt" IS NULL OR t."expiresAt" > timezone('UTC', now()))
          AND i.status::text = 'active' AND w."deletedAt" IS NULL
        ON CONFLICT ("agentTokenId") DO UPDATE
            SET "lastUsedAt" = GREATEST({schema}.agent_token_use."lastUsedAt", EXCLUDED."lastUsedAt")
        RETURNING 1
    )
    SELECT EXISTS (SELECT FROM stamped)
"""),
)

SCHEMA_TRIGGERS = (
    SchemaTrigger("agent_token_only_ends", "agent_token", "BEFORE", "UPDATE", (), "agent_token_only_ends", False),
    SchemaTrigger("agent_token_times", "agent_token", "BEFORE", "INSERT OR UPDATE", (), "agent_token_times", False),
    SchemaTrigger("agent_token_written_by", "agent_token", "BEFORE", "INSERT OR UPDATE", (), "agent_written_by", False),
    SchemaTrigger("agent_token_audited_insert", "agent_token", "AFTER", "INSERT", (), "agent_token_audited", True),
    SchemaTrigger("agent_token_audited_update", "agent_token", "AFTER", "UPDATE", ("expiresAt", "revokedAt"),
                  "agent_token_audited", True),
    SchemaTrigger("agent_identity_revocation_is_final", "agent_identity", "BEFORE", "UPDATE", (),
                  "agent_identity_revocation_is_final", False),
    SchemaTrigger("agent_identity_times", "agent_identity", "BEFORE", "INSERT OR UPDATE", (),
                  "agent_identity_times", False),
    SchemaTrigger("agent_identity_written_by", "agent_identity", "BEFORE", "INSERT", (), "agent_written_by", False),
    SchemaTrigger("agent_identity_audited_insert", "agent_identity", "AFTER", "INSERT", (),
                  "agent_identity_audited", True),
    SchemaTrigger("agent_identity_audited_update", "agent_identity", "AFTER", "UPDATE", ("status",),
                  "agent_identity_audited", True),
    SchemaTrigger("agent_audit_event_chain", "agent_audit_event", "BEFORE", "INSERT", (),
                  "agent_audit_event_chain", False),
    SchemaTrigger("agent_audit_event_append_only", "agent_audit_event", "BEFORE", "UPDATE OR DELETE", (),
                  "agent_audit_event_append_only", False),
    SchemaTrigger("agent_audit_event_no_truncate", "agent_audit_event", "BEFORE", "TRUNCATE", (),
                  "agent_audit_event_no_truncate", False),
)
# The constraints the tables above are made with (checks, keys and foreign keys, by name:
# a constraint added, such as a CHECK that refuses access.denied events, or one taken
# away, is a safeguard changed).
SCHEMA_CONSTRAINTS = {
    "agent_identity": ("agent_identity_createdBy_fkey", "agent_identity_pkey", "agent_identity_publicId_unique",
                       "agent_identity_slug_format", "agent_identity_workspaceId_fkey",
                       "agent_identity_workspace_slug_unique"),
    "agent_token": ("agent_token_agentIdentityId_fkey", "agent_token_createdBy_fkey", "agent_token_pkey",
                    "agent_token_publicId_unique", "agent_token_revokedBy_fkey", "agent_token_rotatedFromId_fkey"),
    "agent_audit_event": ("agent_audit_event_actorUserId_fkey", "agent_audit_event_agentIdentityId_fkey",
                          "agent_audit_event_agentTokenId_fkey", "agent_audit_event_pkey",
                          "agent_audit_event_publicId_unique", "agent_audit_event_workspaceId_fkey"),
    "agent_token_use": ("agent_token_use_agentTokenId_fkey", "agent_token_use_pkey", "agent_token_use_time"),
    "agent_workspace_lock": ("agent_workspace_lock_pkey", "agent_workspace_lock_workspaceId_fkey"),
    "agent_maintainer_login": ("agent_maintainer_login_pkey", "agent_maintainer_login_userId_fkey"),
}
# The tables whose triggers, rules and policies doctor holds to the records above; and
# the one only the functions above read and write (no role of the tool's needs to).
AGENT_TABLES = ("agent_identity", "agent_token", "agent_audit_event", "agent_token_use", "agent_workspace_lock",
                "agent_maintainer_login")
OWNER_ONLY_TABLES = ("agent_workspace_lock", "agent_maintainer_login")


def function_sql(function: SchemaFunction) -> str:
    """A function's CREATE OR REPLACE (and, when private, its REVOKE from PUBLIC)."""
    options = [f"LANGUAGE {function.language} {function.volatility}"]
    if function.definer:
        options.append("SECURITY DEFINER")
    if not function.inlined:
        options.append(f"SET search_path = {SAFE_SEARCH_PATH}")
    text = (f"CREATE OR REPLACE FUNCTION {{schema}}.{function.name}({function.arguments}) "
            f"RETURNS {function.returns}\n{' '.join(options)} AS $${function.body}$$;\n")
    if function.private:
        text += f"REVOKE ALL ON FUNCTION {{schema}}.{function.name}({function.signature}) FROM PUBLIC;\n"
    return text


def trigger_sql(trigger: SchemaTrigger) -> str:
    """A trigger's DDL, made again on each run (a constraint trigger cannot be replaced)."""
    events = trigger.events + (" OF " + ", ".join(f'"{c}"' for c in trigger.columns) if trigger.columns else "")
    level = "STATEMENT" if trigger.events == "TRUNCATE" else "ROW"
    if trigger.deferred:
        return (f"DROP TRIGGER IF EXISTS {trigger.name} ON {{schema}}.{trigger.table};\n"
                f"CREATE CONSTRAINT TRIGGER {trigger.name}\n    {trigger.timing} {events} ON {{schema}}.{trigger.table}"
                f"\n    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {{schema}}.{trigger.function}();\n")
    return (f"CREATE OR REPLACE TRIGGER {trigger.name}\n    {trigger.timing} {events} ON {{schema}}.{trigger.table}\n"
            f"    FOR EACH {level} EXECUTE FUNCTION {{schema}}.{trigger.function}();\n")


SCHEMA_HEADER = """\
-- agent-identity schema {version}: the tables, functions and triggers the agent
-- identity tool and the Kan server share, in schema {schema}, beside Kan's own tables.
-- One transaction, idempotent: safe to run more than once, and it cannot stop half-way.
-- Apply as the owner of Kan's tables (the role Kan's migrations run as; it adds an
-- index to Kan's workspace_members):
--   agent-identity schema | psql -v ON_ERROR_STOP=1 "$POSTGRES_URL"

BEGIN;
SET LOCAL search_path = {safe_path};
SET LOCAL client_min_messages = warning;

"""

SCHEMA_FOOTER = """
-- Like Kan's own tables: row level security on, and no policies but those the role
-- SQL of docs/security.md adds. The owner (the role migrations run as) is not subject
-- to it, nor are the functions above that run as the owner.
ALTER TABLE {schema}.agent_identity ENABLE ROW LEVEL SECURITY;
ALTER TABLE {schema}.agent_token ENABLE ROW LEVEL SECURITY;
ALTER TABLE {schema}.agent_audit_event ENABLE ROW LEVEL SECURITY;
ALTER TABLE {schema}.agent_token_use ENABLE ROW LEVEL SECURITY;
ALTER TABLE {schema}.agent_workspace_lock ENABLE ROW LEVEL SECURITY;
ALTER TABLE {schema}.agent_maintainer_login ENABLE ROW LEVEL SECURITY;

COMMIT;
"""


def schema_sql(db_schema: str = DB_SCHEMA_DEFAULT) -> str:
    """The DDL, every object qualified with the schema that holds Kan's tables."""
    # The chain's helpers come before the backfill, which uses them; the other functions after it.
    helpers = [f for f in SCHEMA_FUNCTIONS if f.name in BACKFILL_FUNCTIONS]
    others = [f for f in SCHEMA_FUNCTIONS if f.name not in BACKFILL_FUNCTIONS]
    text = "".join([
        SCHEMA_HEADER, SCHEMA_TABLES_SQL, "\n",
        *map(function_sql, helpers), "\n", SCHEMA_BACKFILL_SQL, "\n", *map(function_sql, others), "\n",
        *map(trigger_sql, SCHEMA_TRIGGERS), SCHEMA_FOOTER,
    ])
    return text.format(version=__version__, schema=quote_identifier(db_schema), safe_path=SAFE_SEARCH_PATH)


# The columns `schema` creates, which doctor checks a database against; and the
# Kan tables the tool reads.
EXPECTED_COLUMNS = {
    "agent_identity": {
        "id": "bigint", "publicId": "character varying(12)", "workspaceId": "bigint",
        "slug": "character varying(64)", "displayName": "character varying(255)",
        "status": "agent_identity_status", "createdBy": "uuid",
        "createdAt": "timestamp without time zone", "updatedAt": "timestamp without time zone",
        "pausedAt": "timestamp without time zone", "revokedAt": "timestamp without time zone",
    },
    "agent_token": {
        "id": "bigint", "publicId": "character varying(12)", "agentIdentityId": "bigint",
        "name": "character varying(255)", "tokenHash": "text", "scopes": "text[]",
        "expiresAt": "timestamp without time zone", "lastUsedAt": "timestamp without time zone",
        "createdBy": "uuid", "createdAt": "timestamp without time zone",
        "revokedAt": "timestamp without time zone", "revokedBy": "uuid", "rotatedFromId": "bigint",
        "workspaceId": "bigint",
    },
    "agent_audit_event": {
        "id": "bigint", "publicId": "character varying(12)", "workspaceId": "bigint",
        "agentIdentityId": "bigint", "agentTokenId": "bigint", "action": "character varying(64)",
        "actorUserId": "uuid", "actorEmail": "character varying(255)", "reason": "text",
        "metadata": "jsonb", "createdAt": "timestamp without time zone",
        "sequence": "bigint", "workspacePublicId": "character varying(12)",
        "identityPublicId": "character varying(12)", "identitySlug": "character varying(64)",
        "tokenPublicId": "character varying(12)", "actorUserUuid": "uuid",
        "previousHash": "character varying(64)", "hash": "character varying(64)", "login": "name",
    },
    "agent_token_use": {"agentTokenId": "bigint", "lastUsedAt": "timestamp without time zone"},
    "agent_workspace_lock": {"workspaceId": "bigint"},
    "agent_maintainer_login": {"login": "name", "userId": "uuid"},
}
KAN_TABLES = ("user", "workspace", "workspace_members", "workspace_roles",
              "workspace_role_permissions", "workspace_member_permissions")


# --- Database access --------------------------------------------------------


def statement_timeout_ms(lock_timeout: float) -> int:
    """The whole lock wait plus the usual 30 s of work."""
    return STATEMENT_TIMEOUT_MS + round(lock_timeout * 1000)


def session_limits(lock_timeout: float) -> dict[str, str]:
    """The settings every transaction of the tool runs under.

    The statement limit leaves room for the whole lock wait plus the usual
    30 s of work, so a long --lock-timeout ends in exit 5, not exit 6.
    """
    return {
        "TimeZone": "UTC",
        "lock_timeout": f"{round(lock_timeout * 1000)}ms",
        "statement_timeout": f"{statement_timeout_ms(lock_timeout)}ms",
        "idle_in_transaction_session_timeout": f"{IDLE_IN_TRANSACTION_TIMEOUT_MS}ms",
        # Compiling a plan costs more than any statement of the tool runs (half a second for
        # review of 10,000 identities, to save nothing): never.
        "jit": "off",
    }


def connection_target(params: dict) -> dict:
    """Where a connection goes (host, port, database, role), as libpq resolves it; never the password."""
    import getpass

    user = params.get("user") or os.environ.get("PGUSER") or getpass.getuser()
    return {
        "host": params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "",
        "port": str(params.get("port") or os.environ.get("PGPORT") or "5432"),
        "database": params.get("dbname") or os.environ.get("PGDATABASE") or user,
        "role": user,
    }


def describe_target(target: dict) -> str:
    """"database kan at db.internal:5432 as role r", or "... on socket /run/postgresql/.s.PGSQL.5432 ..."."""
    host, port = target["host"], target["port"]
    if not host:  # libpq's default: its compiled-in socket folder
        where = f"on the local socket, port {port}"
    elif host.startswith("/"):
        where = f"on socket {host}/.s.PGSQL.{port}"
    else:
        where = f"at {host}:{port}"
    return f"database {target['database']} {where} as role {target['role']}"


def connect(url: str):
    """Open a connection that works directly and through a pooler (PgBouncer, hosted poolers).

    Only application_name goes as a startup parameter (PgBouncer accepts and
    tracks it); the time limits and the zone are set by transaction() inside
    each transaction, where no pooler can drop them. Statements are never
    prepared by name, which a transaction-mode pooler cannot keep. The
    password is never part of a message: libpq echoes fragments of a bad
    connection string, so that error gets a message of our own.
    """
    import logging

    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    # psycopg logs a few warnings of its own (a query cancellation that failed on a
    # loaded machine after Ctrl-C); with no handler, Python would print them raw on
    # stderr beside the tool's one line, which already says what happened.
    logging.getLogger("psycopg").addHandler(logging.NullHandler())
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise AdminError(
            EXIT_USAGE, "the database URL is not valid (check --database-url, DATABASE_URL or POSTGRES_URL)"
        ) from None
    params["application_name"] = APPLICATION_NAME
    params.setdefault("connect_timeout", os.environ.get("PGCONNECT_TIMEOUT") or CONNECT_TIMEOUT_DEFAULT)
    try:
        conn = psycopg.connect(**params, autocommit=True, prepare_threshold=None)
    except psycopg.Error as exc:
        detail = first_line(exc) or type(exc).__name__
        raise AdminError(
            EXIT_DATABASE,
            redact(f"cannot connect to {describe_target(connection_target(params))}: {detail}"),
        ) from None
    conn.adapters.register_loader("timestamp", far_times_loader())
    return conn


def far_times_loader():
    """psycopg's timestamp loader, reading 'infinity' and '-infinity' (and years a datetime
    cannot hold) as the far ends of datetime's range instead of failing: no version of
    the tool writes one, but a hand may have, and the tool must still read the row."""
    from psycopg import DataError
    from psycopg.types.datetime import TimestampLoader

    class FarTimesLoader(TimestampLoader):
        def load(self, data):
            try:
                return super().load(data)
            except DataError:
                return datetime.min if bytes(data).startswith(b"-") or bytes(data).endswith(b"BC") else datetime.max

    return FarTimesLoader


def target_of(conn) -> dict:
    """Where an open connection writes: what the server says, not what was asked for."""
    info = conn.info
    return {"host": info.host, "port": str(info.port), "database": info.dbname, "role": info.user}


class Session(collections.namedtuple("Session", "schema path now kan_schemas login")):
    """What a transaction learned as it began: the schema that holds Kan's tables (every
    statement names its tables with it), the search_path the session came with, the
    transaction's clock (UTC), every schema of the database that holds a table named
    workspace (more than one: a copy of Kan's tables, which the search_path could pick),
    and who the session's login is (agent_session_login; None before schema is applied)."""

    __slots__ = ()


# Where Kan's tables are, found as Kan finds them: the first schema of the session's
# search_path that holds a table named workspace, never a temporary one. It runs before
# the search_path is made safe, so it names every function, operator and type with its
# schema (even text: a session's temporary type of that name would be found first).
KAN_SCHEMA_SQL = """(
    SELECT n.nspname::pg_catalog.text
    FROM pg_catalog.unnest(pg_catalog.current_schemas(false)) WITH ORDINALITY AS p(name, position)
    JOIN pg_catalog.pg_namespace n ON n.nspname OPERATOR(pg_catalog.=) p.name
    WHERE n.oid OPERATOR(pg_catalog.<>) pg_catalog.pg_my_temp_schema()
      AND EXISTS (SELECT FROM pg_catalog.pg_class c
                  WHERE c.relnamespace OPERATOR(pg_catalog.=) n.oid
                    AND c.relname OPERATOR(pg_catalog.=) 'workspace'
                    AND c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p']::pg_catalog."char"[]))
    ORDER BY p.position
    LIMIT 1)"""
# That schema, the path as PostgreSQL resolves it (doctor's look-alike check), the
# transaction's clock, and every schema that holds a table named workspace.
DISCOVER_SQL = """
SELECT """ + KAN_SCHEMA_SQL + """ AS schema,
       pg_catalog.current_schemas(true)::pg_catalog.text[] AS path,
       pg_catalog.timezone('UTC', pg_catalog.now()) AS now,
       ARRAY(SELECT n.nspname::pg_catalog.text
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
             WHERE c.relname OPERATOR(pg_catalog.=) 'workspace' AND c.relpersistence OPERATOR(pg_catalog.<>) 't'
               AND c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p']::pg_catalog."char"[])
             ORDER BY 1) AS kan_schemas
"""
# Who the session's login is (agent_session_login), in the same message, so it costs no
# round trip of its own: the function's schema is found by the message itself, so it is
# called through a search_path of that schema alone (the one --db-schema names, else the
# one above; functions are looked for in pg_catalog first, never in pg_temp), in a
# savepoint that takes the path back. A database without a working function (doctor
# meets them) costs one more round trip: back to the savepoint, and the rest without it.
LOGIN_SAVEPOINT = "agent_identity_login"
LOGIN_PATH_SQL = """
SELECT pg_catalog.set_config('search_path',
                             COALESCE(pg_catalog.quote_ident(COALESCE({pinned}::pg_catalog.text, """ + \
    KAN_SCHEMA_SQL + """)), ''), true)
"""
SESSION_LOGIN_SQL = "SELECT pg_catalog.to_jsonb(l) FROM agent_session_login() AS l"
NO_LOGIN_SQL = "SELECT NULL::pg_catalog.jsonb"


def connect_limit(conn) -> float:
    """The connection's connect_timeout in seconds, as libpq reads it: 0 or less (or not a
    number) is no limit; less than 2 is 2."""
    try:
        seconds = float(conn.info.get_parameters().get("connect_timeout") or 0)
    except ValueError:
        return 0
    return 0 if seconds <= 0 else max(seconds, 2)


def pooler_wait(conn, seconds: float) -> AdminError:
    """The error of a transaction whose first statement was not answered within the
    connect limit: a pooler (PgBouncer) queues a client until a server connection is
    free, and neither the connect limit nor a cancel reaches that queue."""
    return AdminError(EXIT_DATABASE, f"{describe_target(target_of(conn))} did not begin a transaction within "
                                     f"{seconds:g} s (the connect limit): a connection pooler's queue is full, or the "
                                     "server is not answering; nothing was written")


@contextlib.contextmanager
def transaction(conn, lock_timeout: float, *, read_only: bool = False, schema: str | None = None,
                require_schema: bool = True, commit: bool = True, the_change: bool = False, login: bool = True):
    """One transaction under the tool's limits and a safe search_path, whatever sits between
    the tool and the server; yields its Session.

    BEGIN, the look for Kan's schema (unless --db-schema named it) and a SET LOCAL of
    each limit travel as one message, so they cost the one round trip a bare BEGIN
    costs. SET LOCAL lasts exactly as long as the transaction: a transaction-mode pooler
    that hands the server connection to another client afterwards hands it over clean,
    and every statement of the transaction, its first one's parsing included, runs under
    the limits and resolves names in SAFE_SEARCH_PATH. SET takes no query parameters: the
    values are the tool's own numbers, quoted by psycopg.sql.Literal.
    """
    import psycopg
    from psycopg import sql

    settings = [sql.SQL("SET LOCAL {} = {}").format(sql.SQL(name), sql.Literal(value))
                for name, value in session_limits(lock_timeout).items()]
    # A read sees one snapshot from its first statement on (a chain and the tables it is held
    # to, read by two statements, agree as of one moment; nothing committed meanwhile shows).
    begin = sql.SQL("BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ" if read_only else "BEGIN")
    limit = connect_limit(conn)
    discover, safe_path = sql.SQL(DISCOVER_SQL), sql.SQL(f"SET LOCAL search_path = {SAFE_SEARCH_PATH}")
    # Who the login is, unless the caller knows already (a command's later transactions).
    asked = [sql.SQL(f"SAVEPOINT {LOGIN_SAVEPOINT}"), sql.SQL(LOGIN_PATH_SQL).format(pinned=sql.Literal(schema)),
             sql.SQL(SESSION_LOGIN_SQL), sql.SQL(f"RELEASE SAVEPOINT {LOGIN_SAVEPOINT}")] if login \
        else [sql.SQL(NO_LOGIN_SQL)]
    with SIGNALS.deadline(limit, pooler_wait(conn, limit)):  # a pooler queues this until a server is free
        try:
            cursor = conn.execute(sql.SQL("; ").join([begin, *settings, discover, *asked, safe_path]))
        except psycopg.ProgrammingError as exc:
            # No (working) agent_session_login: the rest without it (doctor goes on to say
            # what is wrong; a command, to what it needs).
            if not (login and (exc.sqlstate or "").startswith("42")):
                raise
            cursor = conn.execute(sql.SQL("; ").join([
                sql.SQL(f"ROLLBACK TO SAVEPOINT {LOGIN_SAVEPOINT}"), sql.SQL(f"RELEASE SAVEPOINT {LOGIN_SAVEPOINT}"),
                discover, sql.SQL(NO_LOGIN_SQL), safe_path]))
    while cursor.description is None:  # past BEGIN and the limits, to what the look for Kan's schema found
        cursor.nextset()
    found, path, now, kan_schemas = cursor.fetchone()
    while cursor.nextset() and (cursor.description is None or cursor.description[0].name == "set_config"):
        pass  # and on to who the login is
    [login] = cursor.fetchone()
    try:
        if require_schema and not (schema or found):
            raise AdminError(EXIT_DATABASE, f"{describe_target(target_of(conn))} does not look like a Kan database "
                                            f"(no table workspace in its search_path, {', '.join(path)})")
        if require_schema and not schema and len(kan_schemas) > 1:
            # A copy of Kan's tables, which a role's own search_path could make the tool act on.
            raise AdminError(EXIT_DATABASE, f"Kan's tables are in more than one schema of "
                                            f"{describe_target(target_of(conn))} ({', '.join(kan_schemas)}): name the "
                                            "one Kan uses with --db-schema or AGENT_IDENTITY_DB_SCHEMA, and run "
                                            "`agent-identity doctor`")
        yield Session(schema or found, path, now, kan_schemas, login)
    except BaseException:
        if not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        raise
    if not commit:  # a dry run: whatever its checks took (a workspace's turn) goes back
        conn.execute("ROLLBACK")
        return
    try:
        conn.execute("COMMIT")
        SIGNALS.committed = SIGNALS.committed or the_change  # the command's own change, not a refusal's event
    except KeyboardInterrupt as exc:
        if read_only:
            raise
        raise AdminError(exit_code_of_interrupt(exc), "interrupted while committing: the change may or may not "
                                                      "have been made; check with inspect before trying again") from None
    except psycopg.OperationalError as exc:
        if read_only:
            raise
        # The COMMIT went out and its answer never came back: it may have been made.
        raise AdminError(
            EXIT_DATABASE,
            f"lost the database connection while committing ({first_line(exc) or type(exc).__name__}): "
            "the change may or may not have been made; check with inspect before trying again",
        ) from None


class Database:
    """What a command works through: its connection, as its actor, with what each of its
    transactions needs — the lock timeout, the schema the operator named (if any), and
    whether this is a dry run (whose transactions roll back). Its first transaction
    learns who the session's login is, and from that and the claim (if any) the actor."""

    def __init__(self, conn, args: argparse.Namespace, claim: str | None):
        self.conn, self.claim, self.actor, self.login = conn, claim, None, None
        self.lock_timeout = args.lock_timeout
        self.schema = pinned_schema(args)
        self.dry_run = args.dry_run

    @contextlib.contextmanager
    def transaction(self, *, read_only: bool = False, commit: bool | None = None):
        with transaction(self.conn, self.lock_timeout, read_only=read_only, schema=self.schema,
                         commit=not self.dry_run if commit is None else commit,
                         the_change=commit is None and not read_only and not self.dry_run,
                         login=self.login is None) as session:
            if self.login is None:
                self.login = session.login or UNKNOWN_LOGIN
                self.actor = actor_of(self.login, self.claim)
            yield session


CLAIMS_ADVICE = 'or connect as a login of your own (docs/security.md, "Proven actors")'
# Who a session is where agent_session_login is not there (schema not applied, or older):
# nobody's own login, so the actor is the claim, and the command meets what is missing.
UNKNOWN_LOGIN = {"login": None, "mapped": False, "inGroup": False}


def actor_of(login: dict, claim: str | None) -> str:
    """The actor's email: a proven login's own Kan user (a claim naming anybody else is
    refused, exit 4, and audited); else the claim, which a login in the maintainers' group
    that nobody mapped may not make (exit 4, nothing written)."""
    if login["mapped"]:
        if claim is not None and claim.lower() != login["email"].lower():
            raise ClaimRefused(f"login {quote(login['login'])} is {quote(login['email'])}, not {quote(claim)}: a "
                               "proven login acts as its own Kan user only", actor_id=login["userId"], claim=claim)
        return login["email"]
    if login["inGroup"]:
        raise AdminError(EXIT_FORBIDDEN, f"login {quote(login['login'])} is in the maintainers' group but mapped to no "
                                         "Kan user (never mapped, or Kan deleted its user): the tables' owner maps it "
                                         "with docs/security.md's maintainer-login SQL; nothing was done")
    if claim is None:
        raise AdminError(EXIT_USAGE, f"say who you are: --admin-user-email or AGENT_IDENTITY_ADMIN_EMAIL, {CLAIMS_ADVICE}")
    return claim


def compose(template: str, schema: str, **parts):
    """A statement from its template: {s} is the schema that holds Kan's tables (quoted), and
    each other {name} a part, itself a template (str) or already composed. The one way
    the tool makes SQL; values always travel as parameters."""
    from psycopg import sql

    return sql.SQL(template).format(s=sql.Identifier(schema), **{
        name: compose(part, schema) if isinstance(part, str) else part for name, part in parts.items()})


def database_error(exc: Exception, lock_timeout: float, target: dict, holders: str = "") -> AdminError:
    """Translate a psycopg error met while running a command against target; holders says
    who held the lock a timed-out statement waited for."""
    from psycopg import errors

    if isinstance(exc, (errors.LockNotAvailable, errors.DeadlockDetected)):
        return AdminError(
            EXIT_CONFLICT,
            f"busy: another session is changing this workspace{holders} (waited {lock_timeout:g} s for its "
            "lock); nothing was written: try again, or wait longer with --lock-timeout",
        )
    if isinstance(exc, errors.QueryCanceled):
        return AdminError(
            EXIT_DATABASE,
            f"the database did not answer within {statement_timeout_ms(lock_timeout) / 1000:g} s; nothing was written",
        )
    if isinstance(exc, (errors.UndefinedTable, errors.UndefinedObject, errors.UndefinedColumn,
                        errors.UndefinedFunction)):
        missing = exc.diag.message_primary or str(exc)
        if "agent_" in missing:
            return AdminError(
                EXIT_DATABASE,
                f"the agent tables are missing or out of date in {describe_target(target)} ({missing}): "
                "run `agent-identity doctor` to see where Kan's tables are, then apply "
                "`agent-identity schema` there as their owner",
            )
        return AdminError(EXIT_DATABASE, f"{describe_target(target)} does not look like a Kan database ({missing})")
    if isinstance(exc, (errors.FeatureNotSupported, errors.CheckViolation)):
        return AdminError(
            EXIT_DATABASE,
            f"the database refused the tool's statement ({exc.diag.message_primary}): a rule, trigger or constraint "
            "on the agent tables is in the way, and nothing was written; run `agent-identity doctor`",
        )
    if isinstance(exc, errors.InsufficientPrivilege):
        return AdminError(
            EXIT_DATABASE,
            f"role {target['role']} may not do this in {describe_target(target)} "
            f"({exc.diag.message_primary}): give it the grants of docs/security.md (run `agent-identity doctor`)",
        )
    sqlstate = exc.sqlstate
    # No SQLSTATE: the client lost the server; 08: connection exceptions; 57P: the server shut down.
    if isinstance(exc, errors.OperationalError) and (sqlstate is None or sqlstate.startswith(("08", "57P"))):
        return AdminError(
            EXIT_DATABASE, f"lost the database connection: {first_line(exc) or type(exc).__name__}; nothing was written"
        )
    return AdminError(EXIT_INTERNAL, f"unexpected database error {sqlstate}: {exc.diag.message_primary}")


# Who holds what a timed-out statement waited for: the transaction that locked the row
# PostgreSQL names (its xmax), or else every other session holding a lock on the agent
# tables that makes a writer wait (a row lock's table lock, or stronger).
ROW_LOCKER_SQL = """
SELECT t.xmax::text FROM {s}.{table} t WHERE t.ctid = %(ctid)s::tid
"""
LOCK_HOLDERS_SQL = """
SELECT DISTINCT a.pid, a.usename::text AS role, a.application_name
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.granted AND l.pid <> pg_backend_pid()
  AND CASE WHEN %(xid)s::text IS NOT NULL
           THEN l.locktype = 'transactionid' AND l.transactionid::text = %(xid)s::text
           ELSE l.locktype = 'relation' AND l.mode NOT IN ('AccessShareLock', 'ShareUpdateExclusiveLock')
                AND l.relation IN (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                   WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s)) END
ORDER BY a.pid
LIMIT 3
"""
LOCKED_TUPLE_RE = LazyPattern(r'tuple \((?P<ctid>[0-9]+,[0-9]+)\) in relation "(?P<table>agent_identity|agent_token)"')


def lock_holders(conn, exc: Exception, schema: str | None) -> str:
    """", held by pid 4242 (role kan_agent_server, application \"psql\")" after a lock
    timeout, or "" when nothing can be said: the transaction holding the row PostgreSQL
    names, else the sessions holding locks on the agent tables that make a writer wait.
    Runs after the rollback, in a short transaction of its own."""
    import psycopg
    from psycopg.rows import dict_row

    if conn.closed:
        return ""
    found = LOCKED_TUPLE_RE.search(getattr(exc.diag, "context", None) or "")
    try:
        with transaction(conn, LOCK_TIMEOUT_MIN * 100, read_only=True, schema=schema) as session:
            schema = session.schema
            xid = found and conn.execute(compose(ROW_LOCKER_SQL, schema, table=psycopg.sql.Identifier(found["table"])),
                                         {"ctid": f"({found['ctid']})"}).fetchone()
            params = {"schema": schema, "tables": list(AGENT_TABLES), "xid": xid[0] if xid and xid[0] != "0" else None}
            holders = conn.cursor(row_factory=dict_row).execute(LOCK_HOLDERS_SQL, params).fetchall()
            if not holders and params["xid"]:
                holders = conn.cursor(row_factory=dict_row).execute(LOCK_HOLDERS_SQL, dict(params, xid=None)).fetchall()
    except (psycopg.Error, AdminError):
        return ""
    said = [f"pid {h['pid']} (role {h['role'] or '?'}, application {quote(h['application_name'] or '')})"
            for h in holders]
    return f", held by {' or '.join(said)}" if said else ""


# The actor and what Kan's rule lets them manage, as CTEs that the access check (one
# workspace) and the commands across workspaces (workspaces, expiring, review, audit
# head and verify) share: the actor; their active memberships ({scope} narrows them to
# one workspace: whether they are a member at all, for the refusal's words); and the
# workspaces they manage, by agent_managed_workspaces — the rule itself, defined once in
# the schema (an explicit deny on any membership wins, as in AWS IAM).
MANAGER_CTES = """
actor AS (
    SELECT "id", email
    FROM {s}."user"
    WHERE lower(email) = lower(%(email)s)
    ORDER BY email = %(email)s DESC
    LIMIT 1
),
membership AS (
    SELECT m."id", m."roleId", m.role::text AS role, m."workspaceId"
    FROM {s}.workspace_members m
    JOIN actor ON m."userId" = actor."id"
    WHERE m.status::text = 'active' AND m."deletedAt" IS NULL {scope}
),
manager AS (
    SELECT managed AS "workspaceId"
    FROM actor
    CROSS JOIN LATERAL {s}.agent_managed_workspaces(actor."id") AS managed
    WHERE true {manager_scope}
)"""
EVERY_WORKSPACE = ""
ONE_WORKSPACE = 'AND m."workspaceId" = (SELECT "id" FROM ws)'


def manager_ctes(scope: str) -> str:
    """MANAGER_CTES for every workspace (EVERY_WORKSPACE) or the one ws names (ONE_WORKSPACE)."""
    return MANAGER_CTES.replace("{scope}", scope).replace(
        "{manager_scope}", scope.replace('m."workspaceId"', "managed"))

# The check that precedes every workspace command, in one query: does the
# workspace exist, is the actor a Kan user, an active member, and a manager by
# Kan's rule on one of their active memberships. A change takes the workspace's
# turn ({turn}) before anything else is locked — so a change of one identity
# and one of them all can never wait on each other in a circle — and learns how far
# the workspace's chain had come once the turn was its own (head_after_lock), to
# compare with what this statement's snapshot saw (head_seen). The identity is read,
# and locked for a mutation, only when the actor passes.
ACCESS_SQL = """
WITH ws AS (
    SELECT "id", "publicId", "deletedAt" IS NOT NULL AS deleted, {turn}
    FROM {s}.workspace
    WHERE {workspace}
),""" + manager_ctes(ONE_WORKSPACE) + """,
target AS (
    SELECT i."id", i."publicId", i.slug, i."displayName", i.status::text AS status,
           i."createdAt", i."updatedAt", i."pausedAt", i."revokedAt", i.xmin::text AS version
    FROM {s}.agent_identity i
    WHERE i."workspaceId" = (SELECT "id" FROM ws WHERE NOT deleted)
      AND {identity}
      AND EXISTS (SELECT 1 FROM manager)
    {lock}
)
SELECT timezone('utc', now()) AS now,
       ws."id" AS workspace_id,
       ws."publicId" AS workspace_public_id,
       ws.deleted AS workspace_deleted,
       ws.head_after_lock,
       ws.head_seen,
       actor."id" AS actor_id,
       actor.email AS actor_email,
       EXISTS (SELECT 1 FROM membership) AS is_member,
       EXISTS (SELECT 1 FROM manager) AS is_manager,
       to_jsonb(target) AS identity,
       {tokens} AS tokens,
       CASE WHEN EXISTS (SELECT 1 FROM manager) THEN {detail} END AS detail,
       (SELECT i.xmin::text FROM {s}.agent_identity i WHERE i."id" = target."id") AS seen_version
FROM (SELECT) AS one
LEFT JOIN ws ON true
LEFT JOIN actor ON true
LEFT JOIN target ON true
"""
TAKE_TURN = """{s}.agent_lock_workspace("id") AS head_after_lock,
           coalesce((SELECT h."sequence" FROM {s}.agent_audit_chain_head("id") AS h), 0) AS head_seen"""
NO_TURN = "NULL::bigint AS head_after_lock, NULL::bigint AS head_seen"

# --workspace W: the workspace whose public id or slug W is; a public id wins.
WORKSPACE_BY_ID = '"publicId" = %(workspace)s'
WORKSPACE_BY_NAME = """"id" = (
        SELECT w."id" FROM {s}.workspace w
        WHERE w."publicId" = %(workspace)s OR w.slug = %(workspace)s
        ORDER BY w."publicId" = %(workspace)s DESC
        LIMIT 1
    )"""
# The workspace of a token, for verify without --workspace-public-id and --token alone.
TOKEN_WORKSPACE = """"id" = (
        SELECT i."workspaceId"
        FROM {s}.agent_token t
        JOIN {s}.agent_identity i ON i."id" = t."agentIdentityId"
        WHERE t."publicId" = %(token_public_id)s
    )"""
IDENTITY_BY_SLUG = "i.slug = %(slug)s"
# The identity that holds a token (inspect --token, revoke --token without --slug).
IDENTITY_BY_TOKEN = """i."id" = (SELECT t."agentIdentityId" FROM {s}.agent_token t
              WHERE t."publicId" = %(token_public_id)s)"""

# A live token: not revoked, and not expired by the database's clock.
LIVE = """({t}."revokedAt" IS NULL AND ({t}."expiresAt" IS NULL OR {t}."expiresAt" > timezone('utc', now())))"""
# When token t was last used: the server's latest stamp, or what a server before 0.4.0 wrote.
LAST_USED = """greatest(t."lastUsedAt", (SELECT u."lastUsedAt" FROM {s}.agent_token_use u
                                           WHERE u."agentTokenId" = t."id")) AS "lastUsedAt" """

# An identity's tokens, newest first, never their hashes, as one JSON array.
# The access query reads them in the same statement as its lock (for the
# commands that need them); if it had to wait for that lock, its snapshot is
# older than the lock and they are read again (see check_access).
TOKENS_SQL = """(
    SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY t."id" DESC), '[]'::jsonb)
    FROM (
        SELECT t."id", t."publicId", t.name, t.scopes, t."createdAt", t."expiresAt", """ + LAST_USED + """,
               t."revokedAt", source."publicId" AS "rotatedFromPublicId",
               -- the lifetime it was issued with, as its issuing event recorded it
               (SELECT e.metadata->>'expiresIn'
                FROM {s}.agent_audit_event e
                WHERE e."tokenPublicId" = t."publicId"
                  AND e.action IN ('identity.created', 'identity.token_rotated')
                ORDER BY e."createdAt", e."id" LIMIT 1) AS "issuedFor"
        FROM {s}.agent_token t
        LEFT JOIN {s}.agent_token source ON source."id" = t."rotatedFromId"
        WHERE t."agentIdentityId" = {identity}
    ) AS t
)"""

# What a read asks for beside the access check, in the same statement; each
# is computed only for an actor who passes it (ACCESS_SQL's {detail}).
# inspect: the identity's latest audit events in its workspace, newest first, found by
# the public id the chain keeps (a cascade cannot detach them).
EVENTS_DETAIL = """(
    SELECT coalesce(jsonb_agg(to_jsonb(e) ORDER BY e."createdAt" DESC, e."id" DESC), '[]'::jsonb)
    FROM (
        SELECT e."id", e."publicId", e.action, e."actorEmail", e.reason, e.metadata, e."createdAt",
               e."tokenPublicId"
        FROM {s}.agent_audit_event e
        WHERE e."identityPublicId" = (SELECT "publicId" FROM target) AND e."workspaceId" = (SELECT "id" FROM ws)
        ORDER BY e."createdAt" DESC, e."id" DESC
        LIMIT %(events)s
    ) AS e
)"""

# Live tokens of identities not revoked that expire within %(within)s, soonest
# first, in the workspaces the actor manages (in the access check, the one
# workspace checked): for expiring, and for list's warnings about the whole
# workspace, not only the page shown.
# A superseded token: a newer live one of its identity exists (a rotation with --grace
# left it to run out: its expiry is meant).
SUPERSEDED = """EXISTS (SELECT FROM {s}.agent_token n WHERE n."agentIdentityId" = t."agentIdentityId" AND n."id" > t."id"
                      AND """ + LIVE.replace("{t}", "n") + ")"
EXPIRING_TOKENS = """(
    SELECT coalesce(jsonb_agg(to_jsonb(x) ORDER BY x."expiresAt", x."id"), '[]'::jsonb)
    FROM (
        SELECT t."id", t."publicId", t.name, t."expiresAt", i.slug, i."publicId" AS "identityPublicId",
               w."publicId" AS "workspacePublicId", w.slug AS "workspaceSlug", """ + SUPERSEDED + """ AS superseded
        FROM manager
        JOIN {s}.workspace w ON w."id" = manager."workspaceId" AND w."deletedAt" IS NULL
        JOIN {s}.agent_identity i ON i."workspaceId" = w."id" AND i.status::text <> 'revoked'
        JOIN {s}.agent_token t ON t."agentIdentityId" = i."id"
        WHERE t."revokedAt" IS NULL
          AND t."expiresAt" > timezone('utc', now())
          AND t."expiresAt" <= timezone('utc', now()) + %(within)s
          AND (%(superseded)s OR NOT """ + SUPERSEDED + """)
    ) AS x
)"""
# Active identities of the managed workspaces with no live token: their agents cannot
# reach Kan (every token expired, or revoked one by one). lastExpiredAt: when the last
# one it had ran out, if one did.
DOWN_IDENTITIES = """(
    SELECT coalesce(jsonb_agg(to_jsonb(d) ORDER BY d."workspaceSlug", d.slug), '[]'::jsonb)
    FROM (
        SELECT i."publicId" AS "identityPublicId", i.slug, w."publicId" AS "workspacePublicId",
               w.slug AS "workspaceSlug",
               (SELECT max(t."expiresAt") FROM {s}.agent_token t
                WHERE t."agentIdentityId" = i."id" AND t."revokedAt" IS NULL) AS "lastExpiredAt"
        FROM manager
        JOIN {s}.workspace w ON w."id" = manager."workspaceId" AND w."deletedAt" IS NULL
        CROSS JOIN LATERAL (SELECT * FROM {s}.agent_identity a  -- by its index, workspace by workspace
                            WHERE a."workspaceId" = w."id" AND a.status = 'active' OFFSET 0) AS i
        WHERE NOT EXISTS (SELECT FROM {s}.agent_token t WHERE t."agentIdentityId" = i."id" AND """ + \
    LIVE.replace("{t}", "t") + """)
    ) AS d
)"""
# What expiring checks (in the workspaces the actor manages, or in the one the access
# check found): the tokens, the down identities, and how many of each it looked at.
EXPIRING_DETAIL = """jsonb_build_object(
    'tokens', """ + EXPIRING_TOKENS + """,
    'down', """ + DOWN_IDENTITIES + """,
    'workspaces', (SELECT count(*) FROM manager JOIN {s}.workspace w ON w."id" = manager."workspaceId"
                   AND w."deletedAt" IS NULL),
    'identities', (SELECT coalesce(sum(c.n), 0) FROM manager CROSS JOIN LATERAL (
                       SELECT count(*) AS n FROM {s}.agent_identity i
                       WHERE i."workspaceId" = manager."workspaceId" AND i.status::text <> 'revoked') AS c))"""

# list: one page of the workspace's identities, newest first, starting just
# after the identity named by --after (and whether that one exists).
LIST_DETAIL = """(
    WITH after AS (
        SELECT "createdAt", "id"
        FROM {s}.agent_identity
        WHERE "workspaceId" = (SELECT "id" FROM ws) AND "publicId" = %(after)s
    ),
    page AS (
        SELECT i."id", i."publicId", i.slug, i."displayName", i.status::text AS status,
               i."createdAt", i."updatedAt", i."pausedAt", i."revokedAt",
               tokens."liveTokens", tokens."nextExpiresAt", tokens."lastUsedAt"
        FROM {s}.agent_identity i
        CROSS JOIN LATERAL (
            SELECT count(*) FILTER (WHERE t.live) AS "liveTokens",
                   min(t."expiresAt") FILTER (WHERE t.live) AS "nextExpiresAt",
                   max(t."lastUsedAt") AS "lastUsedAt"
            FROM (
                SELECT t."expiresAt", """ + LAST_USED + """, """ + LIVE.replace("{t}", "t") + """ AS live
                FROM {s}.agent_token t
                WHERE t."agentIdentityId" = i."id"
            ) AS t
        ) AS tokens
        WHERE i."workspaceId" = (SELECT "id" FROM ws)
          AND (%(status)s::text IS NULL OR i.status::text = %(status)s::text)
          AND (%(after)s::text IS NULL
               OR (i."createdAt", i."id") < ((SELECT "createdAt" FROM after), (SELECT "id" FROM after)))
        ORDER BY i."createdAt" DESC, i."id" DESC
        LIMIT %(limit)s
    )
    SELECT jsonb_build_object(
        'expiring', """ + EXPIRING_TOKENS + """,
        'cursorFound', %(after)s::text IS NULL OR EXISTS (SELECT 1 FROM after),
        'identities', coalesce((SELECT jsonb_agg(to_jsonb(page) ORDER BY page."createdAt" DESC, page."id" DESC)
                                FROM page), '[]'::jsonb))
)"""

# Every mutation is one statement. Its own CTEs end in `identity_after` (the
# identity row as the change leaves it) and `subject` (the identity and token
# the event is about); AUDIT_INSERT then writes the audit event, and the statement
# returns the identity with the number of events written, which write() holds to the
# one it meant: the change and its audit row cannot part, and a trigger or rule that
# drops the event cannot pass unseen.
AUDIT_COLUMNS = """("publicId", "workspaceId", "agentIdentityId", "agentTokenId", action,
     "actorUserId", "actorEmail", reason, metadata)"""
AUDIT_INSERT = """,
audit AS (
    INSERT INTO {s}.agent_audit_event """ + AUDIT_COLUMNS + """
    SELECT %(audit_public_id)s, %(workspace_id)s, subject.identity_id, subject.token_id, %(action)s,
           %(actor_id)s, %(actor_email)s, %(reason)s, %(metadata)s
    FROM subject
    RETURNING "id"
)
SELECT (SELECT to_jsonb(identity_after) FROM identity_after), (SELECT count(*) FROM audit)
"""

CREATE_SQL = """
WITH identity_after AS (
    INSERT INTO {s}.agent_identity ("publicId", "workspaceId", slug, "displayName", status, "createdBy")
    VALUES (%(identity_public_id)s, %(workspace_id)s, %(slug)s, %(display_name)s, 'active', %(actor_id)s)
    RETURNING *
),
new_token AS (
    INSERT INTO {s}.agent_token ("publicId", "agentIdentityId", name, "tokenHash", scopes, "expiresAt", "createdBy")
    SELECT %(token_public_id)s, identity_after."id", %(token_name)s, %(token_hash)s, %(scopes)s,
           %(expires_at)s, %(actor_id)s
    FROM identity_after
    RETURNING "id", "agentIdentityId"
),
subject AS (
    SELECT "agentIdentityId" AS identity_id, "id" AS token_id FROM new_token
)""" + AUDIT_INSERT

# rotate and both kinds of revoke retire the tokens they read under the identity lock.
RETIRE_TOKENS = """
WITH retired AS (
    UPDATE {s}.agent_token
    SET "revokedAt" = timezone('utc', now()), "revokedBy" = %(actor_id)s
    WHERE "id" = ANY(%(revoke_token_ids)s) AND "agentIdentityId" = ANY(%(identity_ids)s) AND "revokedAt" IS NULL
)"""

# A change to an identity's tokens stamps the identity's updatedAt.
TOUCH_IDENTITY = """,
identity_after AS (
    UPDATE {s}.agent_identity SET "updatedAt" = timezone('utc', now()) WHERE "id" = %(identity_id)s
    RETURNING *
)"""

# A rotation with a grace window shortens the old live tokens' lives instead
# of revoking them (LEAST ignores a NULL "expiresAt").
ROTATE_SQL = RETIRE_TOKENS + TOUCH_IDENTITY + """,
graced AS (
    UPDATE {s}.agent_token
    SET "expiresAt" = LEAST("expiresAt", %(grace_until)s)
    WHERE "id" = ANY(%(grace_token_ids)s) AND "agentIdentityId" = %(identity_id)s AND "revokedAt" IS NULL
),
new_token AS (
    INSERT INTO {s}.agent_token
        ("publicId", "agentIdentityId", name, "tokenHash", scopes, "expiresAt", "createdBy", "rotatedFromId")
    VALUES (%(token_public_id)s, %(identity_id)s, %(token_name)s, %(token_hash)s, %(scopes)s,
            %(expires_at)s, %(actor_id)s, %(rotated_from_id)s)
    RETURNING "id", "agentIdentityId"
),
subject AS (
    SELECT "agentIdentityId" AS identity_id, "id" AS token_id FROM new_token
)""" + AUDIT_INSERT

# An identity's move to %(status)s, with the times that go with it.
SET_STATUS = """
    UPDATE {s}.agent_identity
    SET status = %(status)s::text::{s}.agent_identity_status,
        "updatedAt" = timezone('utc', now()),
        "pausedAt" = CASE %(status)s::text
            WHEN 'paused' THEN timezone('utc', now())
            WHEN 'active' THEN NULL
            ELSE "pausedAt" END,
        "revokedAt" = CASE %(status)s::text
            WHEN 'revoked' THEN timezone('utc', now())
            ELSE "revokedAt" END"""

STATUS_SQL = RETIRE_TOKENS + """,
identity_after AS (""" + SET_STATUS + """
    WHERE "id" = %(identity_id)s
    RETURNING *
),
subject AS (
    SELECT "id" AS identity_id, NULL::bigint AS token_id FROM identity_after
)""" + AUDIT_INSERT


# pause, resume and revoke --all: every identity of the workspace the move applies to,
# in id order, locked, with its tokens not yet revoked. The access query reads them in
# the snapshot it began with; if the workspace's chain moved on while it waited for the
# workspace's turn (a create, a rotation), they are read again (BULK_TARGETS_SQL), so
# that what committed before the turn was taken is included.
BULK_TARGETS = """(
    SELECT coalesce(jsonb_agg(to_jsonb(x) ORDER BY x."id"), '[]'::jsonb)
    FROM (
        SELECT i."id", i."publicId", i.slug, i.status::text AS status,
               (SELECT coalesce(jsonb_agg(jsonb_build_object('id', t."id", 'publicId', t."publicId")
                                          ORDER BY t."id"), '[]'::jsonb)
                FROM {s}.agent_token t
                WHERE t."agentIdentityId" = i."id" AND t."revokedAt" IS NULL) AS tokens
        FROM {s}.agent_identity i
        WHERE i."workspaceId" = {workspace_id}
          AND i.status::text = ANY(%(from_statuses)s)
          -- resume --batch: those the batch paused, whose latest pause or resume is still its own
          AND (%(batch)s::text IS NULL OR EXISTS (
              SELECT FROM {s}.agent_audit_event e
              WHERE e."identityPublicId" = i."publicId" AND e."workspaceId" = i."workspaceId"
                AND e.action = 'identity.paused' AND e.metadata->>'batchId' = %(batch)s
                AND NOT EXISTS (SELECT FROM {s}.agent_audit_event later
                                WHERE later."identityPublicId" = e."identityPublicId"
                                  AND later."workspaceId" = e."workspaceId"
                                  AND later.action IN ('identity.paused', 'identity.resumed')
                                  AND later."id" > e."id")))
        ORDER BY i."id"
        FOR UPDATE OF i
    ) AS x
)"""
BULK_TARGETS_SQL = "SELECT " + BULK_TARGETS

# resume --batch that found nothing to resume: was there such a batch at all?
BATCH_EXISTS_SQL = """
SELECT EXISTS (SELECT FROM {s}.agent_audit_event
               WHERE "workspaceId" = %(workspace_id)s AND action = 'identity.paused'
                 AND metadata->>'batchId' = %(batch)s)
"""

# ... then the move of them all, their tokens retired (revoke), and one audit
# event each, in one statement.
BULK_SQL = RETIRE_TOKENS + """,
moved AS (""" + SET_STATUS + """
    WHERE "id" = ANY(%(identity_ids)s)
    RETURNING "id"
),
audit AS (
    INSERT INTO {s}.agent_audit_event """ + AUDIT_COLUMNS + """
    SELECT e."publicId", %(workspace_id)s, e."identityId", NULL, %(action)s, %(actor_id)s, %(actor_email)s,
           %(reason)s, e.metadata
    FROM jsonb_to_recordset(%(events)s) AS e("publicId" text, "identityId" bigint, metadata jsonb)
    RETURNING "id"
)
SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM audit)
"""

# A refused attempt, recorded in a transaction of its own after the
# command's has rolled back: what was tried, by whom, and which condition failed.
ACCESS_DENIED_SQL = """
INSERT INTO {s}.agent_audit_event """ + AUDIT_COLUMNS + """
SELECT %(audit_public_id)s, %(workspace_id)s,
       (SELECT i."id" FROM {s}.agent_identity i WHERE i."workspaceId" = %(workspace_id)s AND i.slug = %(slug)s),
       (SELECT t."id" FROM {s}.agent_token t JOIN {s}.agent_identity i ON i."id" = t."agentIdentityId"
        WHERE i."workspaceId" = %(workspace_id)s AND t."publicId" = %(token_public_id)s),
       'access.denied', %(actor_id)s, %(actor_email)s, %(reason)s, %(metadata)s
RETURNING "id"
"""

# Whether an event is there (after writing a refusal, which no statement of the change
# itself looks for again).
EVENT_EXISTS_SQL = """
SELECT EXISTS (SELECT FROM {s}.agent_audit_event WHERE "publicId" = %(public_id)s)
"""

REVOKE_TOKEN_SQL = RETIRE_TOKENS + TOUCH_IDENTITY + """,
subject AS (
    SELECT %(identity_id)s::bigint AS identity_id, %(token_id)s::bigint AS token_id
)""" + AUDIT_INSERT

EXPIRING_SQL = "WITH" + manager_ctes(EVERY_WORKSPACE) + "\nSELECT " + EXPIRING_DETAIL + \
    """, timezone('utc', now()), EXISTS (SELECT FROM actor)"""

# A time as the tool writes one (iso()): UTC, to the second, with a Z; an infinite one as
# PostgreSQL writes it.
REVIEW_TIME = """CASE WHEN isfinite({t}) THEN to_char({t}, 'YYYY-MM-DD"T"HH24:MI:SS"Z"') ELSE {t}::text END"""

# review: every identity of the managed workspaces (of the one the access check found),
# newest workspace first, then slug, with what an access review asks of it, in one
# statement: its live tokens (count, newest issue, soonest expiry, whether one never
# expires, their scopes and issuers), its tokens' last use, who made it, and whether
# anyone who may manage the workspace now (holders: Kan's rule, agent_managed_workspaces,
# asked once per member of each managed workspace) made it or issued a live token of it.
# Each workspace's identities are read by its index, each identity's tokens by theirs.
REVIEW_DETAIL = """json_build_object(  -- json, not jsonb: text, as it is sent, at a fraction of the cost
    'identities', (
    WITH holders AS MATERIALIZED (
        SELECT DISTINCT m."userId", m."workspaceId"
        FROM manager
        JOIN {s}.workspace_members m ON m."workspaceId" = manager."workspaceId"
        WHERE m."workspaceId" IN (SELECT {s}.agent_managed_workspaces(m."userId"))
    )
    SELECT coalesce(json_agg(json_build_array(
               r."workspacePublicId", r."workspaceSlug", r.slug, r."publicId", r.status, r."createdAt", r."createdBy",
               r."liveTokens", r.scopes, r."newestTokenAt", r."nextExpiry", r."lastUsedAt", r.findings)
               ORDER BY r."workspaceCreatedAt" DESC, r."workspacePublicId", r.slug), '[]'::json)
    FROM (
        SELECT w."publicId" AS "workspacePublicId", w.slug AS "workspaceSlug", w."createdAt" AS "workspaceCreatedAt",
               i."publicId", i.slug, i.status::text AS status, """ + REVIEW_TIME.format(t='i."createdAt"') + """ AS "createdAt",
               maker.email AS "createdBy", tokens."liveTokens", tokens.scopes,
               """ + REVIEW_TIME.format(t='tokens."newestTokenAt"') + """ AS "newestTokenAt",
               """ + REVIEW_TIME.format(t='tokens."nextExpiry"') + """ AS "nextExpiry",
               """ + REVIEW_TIME.format(t='tokens."lastUsedAt"') + """ AS "lastUsedAt",
               -- The findings, judged by the transaction's clock; none for a revoked identity.
               CASE WHEN i.status::text = 'revoked' THEN ARRAY[]::text[] ELSE array_remove(ARRAY[
                   CASE WHEN tokens."neverExpires" THEN 'never-expires' END,
                   CASE WHEN i."createdAt" < timezone('utc', now()) - %(idle)s
                             AND coalesce(tokens."lastUsedAt" < timezone('utc', now()) - %(idle)s, true)
                        THEN 'unused' END,
                   CASE WHEN tokens."newestTokenAt" < timezone('utc', now()) - %(max_age)s THEN 'stale' END,
                   CASE WHEN NOT EXISTS (SELECT FROM holders h
                                         WHERE h."workspaceId" = w."id"
                                           AND (h."userId" = i."createdBy" OR h."userId" = ANY (tokens.issuers)))
                        THEN 'orphaned' END], NULL) END AS findings
        FROM manager
        JOIN {s}.workspace w ON w."id" = manager."workspaceId" AND w."deletedAt" IS NULL
        CROSS JOIN LATERAL (SELECT * FROM {s}.agent_identity a
                            WHERE a."workspaceId" = w."id" AND a.status = ANY(%(statuses)s::{s}.agent_identity_status[])
                            OFFSET 0) AS i  -- not flattened: read workspace by workspace, by its index
        LEFT JOIN {s}."user" maker ON maker."id" = i."createdBy"
        CROSS JOIN LATERAL (
            SELECT count(*) FILTER (WHERE t.live) AS "liveTokens",
                   max(t."createdAt") FILTER (WHERE t.live) AS "newestTokenAt",
                   min(t."expiresAt") FILTER (WHERE t.live) AS "nextExpiry",
                   coalesce(bool_or(t.live AND (t."expiresAt" IS NULL
                                                OR t."expiresAt" > t."createdAt" + %(longest)s)), false)
                       AS "neverExpires",
                   max(t."lastUsedAt") AS "lastUsedAt",
                   string_agg(array_to_string(t.scopes, ','), ',') FILTER (WHERE t.live) AS scopes,
                   array_agg(t."createdBy") FILTER (WHERE t.live AND t."createdBy" IS NOT NULL) AS issuers
            FROM (SELECT t."createdAt", t."expiresAt", t.scopes, t."createdBy", """ + LAST_USED + """,
                         """ + LIVE.replace("{t}", "t") + """ AS live
                  FROM {s}.agent_token t WHERE t."agentIdentityId" = i."id") AS t
        ) AS tokens
    ) AS r),
    'workspaces', (SELECT count(*) FROM manager JOIN {s}.workspace w ON w."id" = manager."workspaceId"
                   AND w."deletedAt" IS NULL))"""
REVIEW_SQL = "WITH" + manager_ctes(EVERY_WORKSPACE) + "\nSELECT " + REVIEW_DETAIL + \
    """, timezone('utc', now()), EXISTS (SELECT FROM actor)"""

# The workspaces the actor may manage, by the access check's own rule, with
# what each holds.
WORKSPACES_SQL = "WITH" + manager_ctes(EVERY_WORKSPACE) + """
SELECT w."publicId", w.slug, w.name,
       identities.active, identities.paused, identities.revoked,
       tokens.live AS "liveTokens", tokens.next AS "nextExpiresAt"
FROM manager
JOIN {s}.workspace w ON w."id" = manager."workspaceId" AND w."deletedAt" IS NULL
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE i.status::text = 'active') AS active,
           count(*) FILTER (WHERE i.status::text = 'paused') AS paused,
           count(*) FILTER (WHERE i.status::text = 'revoked') AS revoked
    FROM {s}.agent_identity i
    WHERE i."workspaceId" = w."id"
) AS identities
CROSS JOIN LATERAL (
    SELECT count(*) AS live, min(t."expiresAt") AS next
    FROM {s}.agent_identity i
    JOIN {s}.agent_token t ON t."agentIdentityId" = i."id"
    WHERE i."workspaceId" = w."id" AND i.status::text <> 'revoked' AND """ + LIVE.replace("{t}", "t") + """
) AS tokens
ORDER BY w.slug, w."publicId"
"""

# verify: the token, with its identity, in the workspace the check found
# (ACCESS_SQL's ws is the token's own workspace unless --workspace-public-id
# names one); expiry is judged by the database's clock, as a server should.
VERIFY_DETAIL = """(
    SELECT to_jsonb(v)
    FROM (
        SELECT t."publicId", t."tokenHash", t.scopes, t."expiresAt", t."revokedAt",
               t."expiresAt" IS NOT NULL AND t."expiresAt" <= timezone('utc', now()) AS expired,
               to_jsonb(i) AS identity
        FROM {s}.agent_token t
        JOIN (SELECT "id", "publicId", slug, "displayName", status::text AS status, "createdAt", "updatedAt",
                     "pausedAt", "revokedAt", "workspaceId"
              FROM {s}.agent_identity) AS i ON i."id" = t."agentIdentityId"
        WHERE t."publicId" = %(token_public_id)s AND i."workspaceId" = (SELECT "id" FROM ws)
    ) AS v
)"""

# An audit event as audit shows it: every value of the chain's encoding (the
# metadata also as the jsonb's text, which the hash covers), so that an export can be
# verified with no database.
EVENT_COLUMNS = """e."publicId", e."sequence", e."workspacePublicId", e.action, e."identityPublicId",
               e."identitySlug", e."tokenPublicId", e."actorUserUuid", e."actorEmail", e.reason, e.metadata,
               e.metadata::text AS "metadataText", e."createdAt", e."previousHash",
               e."hash", e.login """

# audit --after-sequence, and the export of every workspace: a page of the
# workspace's chain, oldest first, after the sequence given; and the events that have no
# place in the chain (written past its trigger), which the last page carries too, so
# that an export verified on its own shows them.
CHAIN_PAGE_DETAIL = """(
    SELECT jsonb_build_object(
        'cursorFound', true,
        'events', coalesce(jsonb_agg(to_jsonb(page) ORDER BY page."sequence"), '[]'::jsonb),
        'unchained', (SELECT coalesce(jsonb_agg(to_jsonb(u) ORDER BY u."publicId"), '[]'::jsonb)
                      FROM (SELECT e."id", """ + EVENT_COLUMNS + """
                            FROM {s}.agent_audit_event e
                            WHERE e."workspaceId" = (SELECT "id" FROM ws) AND e."sequence" IS NULL) AS u))
    FROM (
        SELECT e."id", """ + EVENT_COLUMNS + """
        FROM {s}.agent_audit_event e
        WHERE e."workspaceId" = (SELECT "id" FROM ws) AND e."sequence" > %(after_sequence)s
        ORDER BY e."sequence"
        LIMIT %(limit)s
    ) AS page
)"""

# audit: one page of the workspace's events, newest first, starting just after
# the event named by --after (and whether that one exists), within the window
# and filters given. The columns are UTC timestamps; the window's bounds are
# computed from the transaction's clock in UTC, whatever the server's TimeZone.
# Each filter is either absent (NULL: the planner drops it) or narrows the scan;
# --slug and --token read their own indexes, by the public ids the chain keeps.
AUDIT_DETAIL = """(
    WITH after AS (
        SELECT "createdAt", "id"
        FROM {s}.agent_audit_event
        WHERE "workspaceId" = (SELECT "id" FROM ws) AND "publicId" = %(after)s
    ),
    -- The identity --slug names: its row, or, once Kan has deleted it, the public id the
    -- chain kept (slugs are never reused in a workspace).
    named AS (
        SELECT coalesce((SELECT "publicId" FROM target),
                        (SELECT x."identityPublicId" FROM {s}.agent_audit_event x
                         WHERE x."workspaceId" = (SELECT "id" FROM ws) AND x."identitySlug" = %(slug)s
                         ORDER BY x."id" LIMIT 1)) AS "publicId"
    ),
    page AS (
        SELECT e."id", """ + EVENT_COLUMNS + """
        FROM {s}.agent_audit_event e
        WHERE e."workspaceId" = (SELECT "id" FROM ws)
          AND e."createdAt" >= coalesce(%(since_at)s::timestamp,
                                        timezone('utc', now()) - %(since_ago)s::interval, '-infinity')
          AND e."createdAt" < coalesce(%(until_at)s::timestamp,
                                       timezone('utc', now()) - %(until_ago)s::interval, 'infinity')
          AND (%(slug)s::text IS NULL OR e."identityPublicId" = (SELECT "publicId" FROM named))
          AND (%(token_filter)s::text IS NULL OR e."tokenPublicId" = %(token_filter)s::text)
          AND (%(actor)s::text IS NULL OR lower(e."actorEmail") = lower(%(actor)s))
          AND (%(actions)s::text[] IS NULL OR e.action = ANY(%(actions)s))
          AND (%(after)s::text IS NULL
               OR (e."createdAt", e."id") < ((SELECT "createdAt" FROM after), (SELECT "id" FROM after)))
        ORDER BY e."createdAt" DESC, e."id" DESC
        LIMIT %(limit)s
    )
    SELECT jsonb_build_object(
        'cursorFound', %(after)s::text IS NULL OR EXISTS (SELECT 1 FROM after),
        'identityKnown', %(slug)s::text IS NULL OR (SELECT "publicId" FROM named) IS NOT NULL,
        'tokenKnown', %(token_filter)s::text IS NULL OR EXISTS (
            SELECT FROM {s}.agent_audit_event x
            WHERE x."tokenPublicId" = %(token_filter)s::text AND x."workspaceId" = (SELECT "id" FROM ws)),
        'events', coalesce((SELECT jsonb_agg(to_jsonb(page) ORDER BY page."createdAt" DESC, page."id" DESC)
                            FROM page), '[]'::jsonb))
)"""

# The head of a workspace's audit chain (its highest sequence), and how many of
# its events have no place in the chain; {workspace} is the workspace's id.
CHAIN_HEAD = """(
    SELECT jsonb_build_object(
        'sequence', head."sequence", 'hash', head."hash", 'createdAt', head."createdAt",
        'unchained', (SELECT count(*) FROM {s}.agent_audit_event u
                      WHERE u."workspaceId" = {workspace} AND u."sequence" IS NULL),
        'identities', (SELECT count(*) FROM {s}.agent_identity i WHERE i."workspaceId" = {workspace}))
    FROM (SELECT) AS one
    LEFT JOIN LATERAL {s}.agent_audit_chain_head({workspace}) AS head ON true
)"""

# audit head, audit verify and the audit export without a workspace: every workspace the actor
# manages, with its chain's head (and whether the actor is a Kan user at all).
MANAGED_HEADS_SQL = "WITH" + manager_ctes(EVERY_WORKSPACE) + """
SELECT EXISTS (SELECT FROM actor) AS known, coalesce((
    SELECT jsonb_agg(jsonb_build_object('id', w."id", 'publicId', w."publicId", 'slug', w.slug,
                                        'head', """ + CHAIN_HEAD.replace("{workspace}", 'w."id"') + """)
                     ORDER BY w.slug, w."publicId")
    FROM manager
    JOIN {s}.workspace w ON w."id" = manager."workspaceId" AND w."deletedAt" IS NULL
), '[]'::jsonb) AS workspaces
"""
# audit head and audit verify of one workspace: its slug and head, beside the access check.
ONE_HEAD_DETAIL = """jsonb_build_object('slug', (SELECT w.slug FROM {s}.workspace w WHERE w."id" = ws."id"),
                                  'head', """ + CHAIN_HEAD.replace("{workspace}", 'ws."id"') + ")"

# doctor: every workspace that has audit events or identities, whoever manages it.
LOGIN_WORKSPACES_SQL = """SELECT {s}.agent_login_workspaces()"""
AUDITED_WORKSPACES_SQL = """
SELECT w."id", w."publicId", w.slug
FROM {s}.workspace w
WHERE EXISTS (SELECT 1 FROM {s}.agent_audit_event e WHERE e."workspaceId" = w."id")
   OR EXISTS (SELECT 1 FROM {s}.agent_identity i WHERE i."workspaceId" = w."id")
ORDER BY w.slug, w."publicId"
"""

# A workspace's events in chain order, with the values the chain's encoding
# covers (the metadata as the jsonb's text): what check_chain reads; then the
# first of its events that has no place in the chain, if one has none.
CHAIN_COLUMNS = """
    "publicId", "sequence", "workspacePublicId", action, "identityPublicId", "identitySlug",
    "tokenPublicId", "actorUserUuid", "actorEmail", reason, metadata::text AS metadata, "createdAt",
    "previousHash", "hash", login
"""
CHAIN_EVENTS_SQL = "SELECT" + CHAIN_COLUMNS + """
FROM {s}.agent_audit_event
WHERE "workspaceId" = %(workspace_id)s AND "sequence" IS NOT NULL
ORDER BY "sequence"
"""
UNCHAINED_SQL = "SELECT" + CHAIN_COLUMNS + """
FROM {s}.agent_audit_event
WHERE "workspaceId" = %(workspace_id)s AND "sequence" IS NULL
ORDER BY "id"
LIMIT 1
"""
CHAIN_FETCH_ROWS = 10_000  # rows per fetch: memory stays flat however long the chain


def chain_events(conn, schema: str, workspace_id: int):
    """A workspace's events in chain order, fetched a batch at a time from a server-side
    cursor; then its first unchained event, if any."""
    from psycopg.rows import dict_row

    params = {"workspace_id": workspace_id}
    with conn.cursor(name="agent_audit_chain", row_factory=dict_row) as cursor:
        cursor.itersize = CHAIN_FETCH_ROWS
        cursor.execute(compose(CHAIN_EVENTS_SQL, schema), params)
        yield from cursor
    yield from conn.cursor(row_factory=dict_row).execute(compose(UNCHAINED_SQL, schema), params)


# A workspace's identities and their tokens as the tables hold them, a row per token
# (or per identity without one): what the chain's account of them is held to.
STATE_ROWS_SQL = """
SELECT i."publicId" AS identity, i.status::text AS status, t."publicId" AS token, t."expiresAt", t."revokedAt",
       t.scopes, t.name, encode(sha256(convert_to(t."tokenHash", 'UTF8')), 'hex') AS "hashDigest"
FROM {s}.agent_identity i
LEFT JOIN {s}.agent_token t ON t."agentIdentityId" = i."id"
WHERE i."workspaceId" = %(workspace_id)s
ORDER BY i."id", t."id"
"""


def verify_workspace(conn, schema: str, workspace_id: int, expect: tuple[Head, ...] = (),
                     now: datetime | None = None) -> dict:
    """check_chain of a workspace's events (each pin of expect checked), and then its
    tables held to what the chain says of them (breaks of kind mismatch): one streamed
    pass over each. identities: how many the tables hold that were compared."""
    from psycopg.rows import dict_row

    state = ChainState()
    with contextlib.closing(chain_events(conn, schema, workspace_id)) as events:
        report = check_chain(state.watch(events), expect, now)
    if report["events"] or not report["breaks"]:  # a chain not yet begun has nothing to say of the tables
        report["breaks"] += state.breaks
        with conn.cursor(name="agent_state", row_factory=dict_row) as cursor:
            cursor.itersize = CHAIN_FETCH_ROWS
            cursor.execute(compose(STATE_ROWS_SQL, schema), {"workspace_id": workspace_id})
            report["breaks"] += state.compare(cursor)
    report.update(intact=not report["breaks"], **{"break": report["breaks"][0] if report["breaks"] else None},
                  identities=len(state.compared))
    return report


# An unknown slug's neighbours, for "did you mean" (only ever read for a slug not found).
SLUGS_SQL = """SELECT slug FROM {s}.agent_identity WHERE "workspaceId" = %(workspace_id)s"""


def slugs_in(conn, session: "Session", workspace_id: int) -> list[str]:
    """The slugs of a workspace's identities."""
    return [slug for (slug,) in conn.execute(compose(SLUGS_SQL, session.schema), {"workspace_id": workspace_id})]


def managed_names(conn, schema: str, email: str) -> list[str]:
    """The slugs and public ids of the workspaces the actor may manage (for "did you mean")."""
    rows = conn.execute(compose(WORKSPACES_SQL, schema), {"email": email, "permission": MANAGE_PERMISSION}).fetchall()
    return [name for row in rows for name in row[:2] if name]


class Ref(collections.namedtuple("Ref", "workspace by_name slug token")):
    """What a command names: a workspace — by its public id, by its slug or public id
    (by_name, --workspace), or None for the workspace of the token it names — and in it,
    perhaps, an identity: by its slug, or, with no slug, as the holder of token."""

    __slots__ = ()

    @classmethod
    def of(cls, args: argparse.Namespace) -> "Ref":
        """The Ref of a command's parsed arguments."""
        by_name = getattr(args, "workspace", None)
        return cls(by_name or getattr(args, "workspace_public_id", None), bool(by_name),
                   getattr(args, "slug", None), getattr(args, "token", None))

    @property
    def by_token(self) -> bool:
        return bool(self.token) and not self.slug

    def named(self) -> str:
        return quote(self.workspace) if self.by_name else self.workspace


def check_access(conn, session: Session, ref: Ref, email: str, *, lock: bool = False, tokens: bool = False,
                 detail: str | None = None, params: dict | None = None, must_exist: bool = True,
                 allow_deleted: bool = False) -> dict:
    """Run the workspace and actor check for what ref names; return the workspace, actor,
    identity and now (with tokens, the identity's tokens; with detail, that SQL's JSON).

    Raises exit 3 for a missing (or, unless allow_deleted, deleted) workspace, exit 4
    for an actor who may not manage it, and exit 3 for a slug or token that names no
    identity (unless must_exist is false, as for create). With lock (a change), the
    workspace's turn is taken first and the identity row stays locked until the
    transaction ends. `now` is the transaction's clock, which every later statement of
    it shares.
    """
    from psycopg.rows import dict_row

    query = compose(
        ACCESS_SQL, session.schema,
        workspace=TOKEN_WORKSPACE if ref.workspace is None else WORKSPACE_BY_NAME if ref.by_name else WORKSPACE_BY_ID,
        identity=IDENTITY_BY_TOKEN if ref.by_token else IDENTITY_BY_SLUG,
        lock="FOR UPDATE" if lock else "",
        turn=TAKE_TURN if lock else NO_TURN,
        tokens=compose(TOKENS_SQL, session.schema, identity='target."id"') if tokens else "NULL::jsonb",
        detail=detail or "NULL::jsonb",
    )
    params = {**(params or {}), "workspace": ref.workspace, "email": email, "permission": MANAGE_PERMISSION,
              "slug": ref.slug, "token_public_id": (params or {}).get("token_public_id", ref.token)}
    row = conn.cursor(row_factory=dict_row).execute(query, params).fetchone()
    if row["workspace_id"] is None:
        hint = did_you_mean(ref.workspace, managed_names(conn, session.schema, email)) if ref.by_name else ""
        raise AdminError(EXIT_NOT_FOUND, f"workspace {ref.named()} not found" + hint
                         + rls_hint(conn, session, "workspace"))
    workspace = row["workspace_public_id"]
    if row["workspace_deleted"] and not allow_deleted:
        raise AdminError(EXIT_NOT_FOUND, f"workspace {workspace} has been deleted")
    denied = {"workspace_id": row["workspace_id"], "actor_id": row["actor_id"]}
    if row["actor_id"] is None:
        raise AccessDenied(f"no Kan user has the email {quote(email)}" + rls_hint(conn, session, "user"),
                           condition="not_a_kan_user", **denied)
    if not row["is_member"]:
        raise AccessDenied(f"{quote(row['actor_email'])} is not an active member of workspace {workspace}"
                           + rls_hint(conn, session, "workspace_members"), condition="not_an_active_member",
                           **denied)
    if not row["is_manager"]:
        raise AccessDenied(f"{quote(row['actor_email'])} lacks the {MANAGE_PERMISSION} permission in workspace "
                           f"{workspace}", condition="lacks_workspace_manage", **denied)
    identity = row["identity"] and json_times(row["identity"])
    if ref.by_token and identity is None:
        raise AdminError(EXIT_NOT_FOUND, f"no token {ref.token} in workspace {workspace}")
    if ref.slug is not None and identity is None and must_exist:
        raise AdminError(EXIT_NOT_FOUND, f"no agent identity {ref.slug} in workspace {workspace}"
                         + did_you_mean(ref.slug, slugs_in(conn, session, row["workspace_id"])))
    token_list = row["tokens"]
    if tokens and identity is not None and identity["version"] != row["seen_version"]:
        # We waited for the lock while another session changed the identity (every
        # change to its tokens touches it too): read them again, in a snapshot
        # taken after the lock.
        token_list = conn.execute(compose("SELECT {tokens}", session.schema,
                                          tokens=compose(TOKENS_SQL, session.schema, identity="%(id)s")),
                                  {"id": identity["id"]}).fetchone()[0]
    return {
        "now": row["now"],
        "workspace_id": row["workspace_id"],
        "workspace_public_id": workspace,
        "workspace_deleted": row["workspace_deleted"],
        # Whether another session wrote in the workspace between this statement's snapshot
        # and the workspace's turn becoming ours (a change only).
        "stale": lock and row["head_after_lock"] != row["head_seen"],
        "actor_id": row["actor_id"],
        "actor_email": row["actor_email"],
        "identity": identity,
        "tokens": [json_times(t) for t in token_list or []],
        "detail": row["detail"],
    }


def rls_hint(conn, session: Session, table: str) -> str:
    """A hint for a "not found" that row level security may have caused, or ''."""
    from psycopg.rows import dict_row

    row = conn.cursor(row_factory=dict_row).execute(READABLE_SQL,
                                                    {"tables": [table], "schema": session.schema}).fetchone()
    if row is None or row["past_rls"]:
        return ""
    return f" (row level security may hide rows of {table} from role {row['role']}: run agent-identity doctor)"


JSON_TIMES = ("createdAt", "updatedAt", "pausedAt", "revokedAt", "expiresAt", "lastUsedAt", "nextExpiresAt",
              "lastExpiredAt", "newestTokenAt", "nextExpiry")


def from_database_time(text: str | None) -> datetime | None:
    """A timestamp as PostgreSQL's JSON writes it; 'infinity', '-infinity' and years a
    datetime cannot hold (which no version of the tool writes, but a hand may have) as
    the far ends of datetime's range."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return datetime.min if text.startswith("-") or text.endswith("BC") else datetime.max


def json_times(record: dict) -> dict:
    """A row the database sent as JSON (to_jsonb), its timestamps made datetimes again."""
    return {**record, **{key: from_database_time(record[key]) for key in JSON_TIMES if key in record}}


def access_of(db: "Database", session: Session, args: argparse.Namespace, ref: Ref | None = None,
              **options) -> dict:
    """check_access for what a command's arguments name, as its actor.

    A token looked up with no workspace named is answered the same whether it does not
    exist or lies in a workspace the actor may not manage (exit 3, "no token … in a
    workspace you manage"); the second is audited there as access.denied.
    """
    ref = ref or Ref.of(args)
    try:
        return check_access(db.conn, session, ref, db.actor, **options)
    except AdminError as refused:
        if not ref.by_token or ref.workspace or refused.exit_code not in (EXIT_NOT_FOUND, EXIT_FORBIDDEN):
            raise
        unknown = f"no token {ref.token} in a workspace you manage"
        if isinstance(refused, AccessDenied):
            refused.exit_code, refused.message, refused.token_public_id = EXIT_NOT_FOUND, unknown, ref.token
            raise  # run() records the probe, then says what an unknown token gets
        raise AdminError(EXIT_NOT_FOUND, unknown) from None


def dropped_events(meant: int, written: int) -> AdminError:
    """A statement wrote fewer audit events than it meant: a trigger or rule on the audit
    table dropped them. Nothing is committed."""
    return AdminError(EXIT_DATABASE, f"the audit log took {written} of the {meant} events written to it: a trigger or "
                                     "rule on agent_audit_event drops rows, and nothing was committed; run "
                                     "`agent-identity doctor`")


def write(conn, session: Session, statement: str, params: dict) -> dict:
    """Run one mutation statement; return the identity row as it leaves it."""
    from psycopg.types.json import Jsonb

    params = dict(params, metadata=Jsonb(params["metadata"]))
    identity, events = conn.execute(compose(statement, session.schema), params).fetchone()
    if events != 1:
        raise dropped_events(1, events)
    return json_times(identity)


# The workspaces a refused claim is audited in: the one the command names, or (naming
# none) each one the claimed user manages — whose logs the claim aimed at.
CLAIMED_WORKSPACES_SQL = """
SELECT "id" FROM {s}.workspace WHERE {workspace}
"""
CLAIMED_USER_WORKSPACES_SQL = "WITH" + manager_ctes(EVERY_WORKSPACE) + """
SELECT "workspaceId" FROM manager
"""


def denied_workspaces(db: "Database", session: Session, args: argparse.Namespace, denied: AccessDenied) -> list[int]:
    """The workspaces a refusal is audited in: the one the access check refused, or a refused claim's."""
    if not isinstance(denied, ClaimRefused):
        return [denied.workspace_id]
    ref = Ref.of(args)
    if ref.workspace:
        query = compose(CLAIMED_WORKSPACES_SQL, session.schema,
                        workspace=WORKSPACE_BY_NAME if ref.by_name else WORKSPACE_BY_ID)
    else:
        query = compose(CLAIMED_USER_WORKSPACES_SQL, session.schema)
    return [row[0] for row in db.conn.execute(query, {"workspace": ref.workspace, "email": denied.claim})]


def record_denial(db: "Database", args: argparse.Namespace, denied: AccessDenied) -> None:
    """Write the access.denied events of a refused command, in a transaction of their own."""
    import psycopg
    from psycopg.types.json import Jsonb

    # The token aimed at: verify's, or revoke --token's.
    token_public_id = denied.token_public_id or getattr(args, "token", None)
    params = {
        "slug": getattr(args, "slug", None),
        "token_public_id": token_public_id,
        "actor_id": denied.actor_id,
        "actor_email": db.actor or db.login and db.login["email"],
        "reason": getattr(args, "reason", None),
        "metadata": Jsonb(event_metadata({
            "command": args.command,
            "condition": denied.condition,
            "slug": getattr(args, "slug", None),
            "tokenPublicId": token_public_id,
            **({"claimedEmail": denied.claim} if isinstance(denied, ClaimRefused) else {}),
        })),
    }
    try:
        with db.transaction(commit=True) as session:
            for workspace_id in denied_workspaces(db, session, args, denied):
                params.update(audit_public_id=new_public_id(), workspace_id=workspace_id)
                written = db.conn.execute(compose(ACCESS_DENIED_SQL, session.schema), params).rowcount
                # A rule can take the row elsewhere and still say it was written: look for it.
                landed = db.conn.execute(compose(EVENT_EXISTS_SQL, session.schema),
                                         {"public_id": params["audit_public_id"]}).fetchone()[0]
                if written != 1 or not landed:
                    raise dropped_events(1, int(landed))
    except psycopg.Error as exc:
        raise AdminError(EXIT_DATABASE, f"{denied.message}; and this refusal could not be audited "
                                        f"({exc.diag.message_primary or type(exc).__name__}): a trigger, rule or "
                                        "constraint on agent_audit_event is in the way; run `agent-identity "
                                        "doctor`") from None
    except AdminError as lost:
        raise AdminError(EXIT_DATABASE, f"{denied.message}; and {lost.message}") from None


def event_metadata(metadata: dict) -> dict:
    """An audit event's metadata, stamped with the version of the tool that wrote it."""
    return dict(metadata, toolVersion=__version__)


def audit_params(args: argparse.Namespace, access: dict, action: str, metadata: dict) -> dict:
    return {
        "audit_public_id": new_public_id(),
        "workspace_id": access["workspace_id"],
        "action": action,
        "actor_id": access["actor_id"],
        "actor_email": access["actor_email"],
        "reason": args.reason,
        "metadata": event_metadata(metadata),
    }


# doctor's questions of the catalog. Each takes the schema that holds Kan's tables as a
# parameter and names the catalog's own objects, under the safe search_path.

# The columns of Kan's tables and of the agent tables, in that schema.
DOCTOR_COLUMNS_SQL = """
SELECT c.relname::text AS table, a.attname::text AS column,
       CASE WHEN t.typtype = 'e' THEN t.typname::text ELSE format_type(a.atttypid, a.atttypmod) END AS type
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s) AND c.relkind IN ('r', 'p')
"""

# Where else on the session's search_path tables of these names are (the agent tables
# of an old `schema`, applied beside the wrong schema), first found first.
ELSEWHERE_SQL = """
SELECT c.relname::text AS table, n.nspname::text AS schema
FROM unnest(%(path)s::text[]) WITH ORDINALITY AS p(name, position)
JOIN pg_namespace n ON n.nspname = p.name
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = ANY(%(tables)s) AND c.relkind IN ('r', 'p')
WHERE n.nspname <> %(schema)s
ORDER BY p.position
"""

# Relations named like Kan's or the agent tables that an unqualified name (Kan's own
# queries) would find before the real ones: any temporary one, in any session (a
# pooler hands a session's temporary tables to the next client), and any in a schema
# the search_path puts before the tables' own.
LOOKALIKES_SQL = """
SELECT c.relname::text AS table, n.nspname::text AS schema, c.relpersistence = 't' AS temporary
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN unnest(%(path)s::text[]) WITH ORDINALITY AS p(name, position) ON p.name = n.nspname
WHERE c.relname = ANY(%(tables)s) AND n.nspname <> %(schema)s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND (c.relpersistence = 't'
       OR p.position < (SELECT q.position FROM unnest(%(path)s::text[]) WITH ORDINALITY AS q(name, position)
                        WHERE q.name = %(schema)s))
ORDER BY 1, 2
"""

# What would let a role plant one: this role's right to create temporary tables, and
# the schemas up to the tables' own in which PUBLIC may create.
CREATE_RIGHTS_SQL = """
SELECT has_database_privilege(current_database(), 'TEMPORARY') AS temporary, current_database() AS database,
       ARRAY(SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END
             FROM pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) AS a
             WHERE d.datname = current_database() AND a.privilege_type = 'TEMPORARY'
               AND (a.grantee = 0 OR pg_has_role(a.grantee, 'MEMBER'))
               AND NOT pg_has_role(d.datdba, 'MEMBER')) AS temporary_from,
       ARRAY(SELECT n.nspname::text
             FROM pg_namespace n
             LEFT JOIN unnest(%(path)s::text[]) WITH ORDINALITY AS p(name, position) ON p.name = n.nspname
             WHERE (n.nspname = %(schema)s
                    OR p.position < (SELECT q.position FROM unnest(%(path)s::text[]) WITH ORDINALITY AS q(name, position)
                                     WHERE q.name = %(schema)s))
               AND EXISTS (SELECT FROM aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) AS a
                           WHERE a.grantee = 0 AND a.privilege_type = 'CREATE')
             ORDER BY p.position) AS public_create
"""

# Whether this role reads a table's rows: the SELECT privilege, and past row level
# security (owner, superuser, BYPASSRLS, or a policy that admits it). doctor asks it of
# every table; a command asks it of a table whose row it needed and did not find (rls_hint).
READABLE_SQL = """
SELECT t.name AS table, current_user AS role,
       has_any_column_privilege(c."oid", 'SELECT') AS can_select,
       NOT c.relrowsecurity
         OR pg_has_role(c.relowner, 'MEMBER')
         OR r.rolsuper OR r.rolbypassrls
         OR EXISTS (SELECT 1 FROM pg_policy p
                    WHERE p.polrelid = c."oid" AND p.polcmd IN ('r', '*')
                      AND (p.polroles = '{0}' OR EXISTS (SELECT 1 FROM unnest(p.polroles) AS role
                                                          WHERE pg_has_role(role, 'MEMBER')))) AS past_rls
FROM unnest(%(tables)s::text[]) AS t(name)
JOIN pg_namespace n ON n.nspname = %(schema)s
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.name
JOIN pg_roles r ON r.rolname = current_user
"""

# What the tool writes, and whether this role may: insert into the agent tables, update
# the columns that end things, and take a workspace's turn.
WRITABLE_SQL = """
SELECT ARRAY(SELECT what FROM (VALUES
    ('INSERT on agent_identity', has_table_privilege(format('%%I.agent_identity', %(schema)s::text), 'INSERT')),
    ('INSERT on agent_token', has_table_privilege(format('%%I.agent_token', %(schema)s::text), 'INSERT')),
    ('INSERT on agent_audit_event', has_table_privilege(format('%%I.agent_audit_event', %(schema)s::text), 'INSERT')),
    ('UPDATE of agent_identity.status',
     has_column_privilege(format('%%I.agent_identity', %(schema)s::text), 'status', 'UPDATE')),
    ('UPDATE of agent_token."revokedAt"',
     has_column_privilege(format('%%I.agent_token', %(schema)s::text), 'revokedAt', 'UPDATE')),
    ('EXECUTE on agent_lock_workspace(bigint)',
     has_function_privilege(format('%%I.agent_lock_workspace(bigint)', %(schema)s::text), 'EXECUTE'))
    ) AS wanted(what, granted) WHERE NOT granted)
"""

# Live tokens whose hash was made with other argon2 parameters (an earlier
# version's, 50-100 times slower to check): they verify, and rotating re-hashes.
OLD_HASHES_SQL = """
SELECT count(*)
FROM {s}.agent_token t
WHERE """ + LIVE.replace("{t}", "t") + """ AND left(t."tokenHash", length(%(prefix)s)) <> %(prefix)s
"""

# What the server says each of the tool's limits is, inside one of its transactions.
LIMITS_SQL = """
SELECT name, setting FROM pg_settings WHERE name = ANY(%(names)s)
"""

# The safeguards as they are: the functions named like schema's, the triggers, rules and
# policies on the agent tables, and whether row level security is on for each.
FUNCTIONS_SQL = """
SELECT p.proname::text AS name, p.prosrc AS body, l.lanname::text AS language, p.provolatile::text AS volatility,
       p.prosecdef AS definer, coalesce(p.proconfig, '{}') AS config, p.proisstrict AS strict,
       p.proretset AS returns_set, p.pronargs::int AS arguments, p.proleakproof AS leakproof,
       EXISTS (SELECT FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) AS a
               WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE') AS public_execute
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE n.nspname = %(schema)s AND p.proname = ANY(%(names)s)
"""
TRIGGERS_SQL = """
SELECT c.relname::text AS table, t.tgname::text AS name, t.tgenabled::text AS enabled, t.tgtype::int AS type,
       fn.nspname::text AS function_schema, f.proname::text AS function, t.tgconstraint <> 0 AS deferrable,
       t.tginitdeferred AS deferred, t.tgqual IS NOT NULL AS conditional, t.tgnargs AS arguments,
       ARRAY(SELECT a.attname::text FROM unnest(t.tgattr::int2[]) AS k(number)
             JOIN pg_attribute a ON a.attrelid = t.tgrelid AND a.attnum = k.number ORDER BY 1) AS columns,
       current_setting('session_replication_role') AS replication_role
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc f ON f.oid = t.tgfoid
JOIN pg_namespace fn ON fn.oid = f.pronamespace
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s) AND NOT t.tgisinternal
"""
RULES_SQL = """
SELECT tablename::text AS table, rulename::text AS name FROM pg_rules
WHERE schemaname = %(schema)s AND tablename = ANY(%(tables)s)
"""
POLICIES_SQL = """
SELECT tablename::text AS table, policyname::text AS name, permissive, cmd,
       replace(qual, quote_ident(%(schema)s) || '.agent_login_workspaces()', 'agent_login_workspaces()') AS qual,
       replace(with_check, quote_ident(%(schema)s) || '.agent_login_workspaces()', 'agent_login_workspaces()')
           AS with_check,
       'public' = ANY(roles) AS everyone
FROM pg_policies
WHERE schemaname = %(schema)s AND tablename = ANY(%(tables)s)
"""
CONSTRAINTS_SQL = """
SELECT c.relname::text AS table, k.conname::text AS name
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s) AND k.contype IN ('c', 'f', 'p', 'u', 'x')
"""
SECURED_SQL = """
SELECT c.relname::text AS table, c.relrowsecurity AS enabled, c.relforcerowsecurity AS forced
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s)
"""
# The policies docs/security.md's role SQL creates on the agent tables, by what they
# admit (their role names are the deployment's own): (table, command, USING, WITH CHECK).
# The shared role's admit it everywhere; the maintainers' group's, a login to the
# workspaces its Kan user may manage (and to the refusals it wrote).
MANAGED = '("workspaceId" = ANY (ARRAY( SELECT agent_login_workspaces() AS agent_login_workspaces)))'
EXPECTED_POLICIES = {
    *((table, "SELECT", "true", None) for table in ("agent_identity", "agent_token", "agent_audit_event")),
    *((table, "INSERT", None, "true") for table in ("agent_identity", "agent_token", "agent_audit_event")),
    *((table, "UPDATE", "true", "true") for table in ("agent_identity", "agent_token")),
    ("agent_token_use", "SELECT", "true", None),
    *((table, "SELECT", MANAGED, None) for table in ("agent_identity", "agent_token")),
    *((table, "INSERT", None, MANAGED) for table in ("agent_identity", "agent_token")),
    *((table, "UPDATE", MANAGED, MANAGED) for table in ("agent_identity", "agent_token")),
    ("agent_audit_event", "SELECT",
     f"({MANAGED} OR (((action)::text = 'access.denied'::text) AND (login = SESSION_USER)))", None),
    ("agent_audit_event", "INSERT", None, f"({MANAGED} OR ((action)::text = 'access.denied'::text))"),
}

# What would let this session's login past row level security on the agent tables: a
# superuser or BYPASSRLS login, membership of the tables' owner, or a policy that admits
# one of its roles to every row (the shared role's; agent_token_use's, which names nothing, aside).
UNHELD_SQL = """
SELECT 'it is a superuser or BYPASSRLS' FROM pg_roles r
WHERE r.rolname = session_user AND (r.rolsuper OR r.rolbypassrls)
UNION ALL
SELECT 'it is a member of the tables'' owner' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = 'agent_identity' AND pg_has_role(session_user, c.relowner, 'MEMBER')
UNION ALL
SELECT DISTINCT format('policy %%I on %%I admits %%s to every row', p.policyname, p.tablename,
                       array_to_string(p.roles, ', '))
FROM pg_policies p
WHERE p.schemaname = %(schema)s AND p.tablename = ANY(%(tables)s) AND p.tablename <> 'agent_token_use'
  AND (p.qual = 'true' OR p.with_check = 'true')
  AND EXISTS (SELECT FROM unnest(p.roles) AS role WHERE role = 'public' OR pg_has_role(session_user, role, 'MEMBER'))
"""

# Times the tool cannot stand behind: infinite, or outside the years 1 to 9999 (which
# no version of the tool writes, and the database now refuses), and a token that
# expires before it was made.
BAD_TIMES = [(table, column) for table, columns in (
    ("agent_identity", ("createdAt", "updatedAt", "pausedAt", "revokedAt")),
    ("agent_token", ("createdAt", "expiresAt", "lastUsedAt", "revokedAt")),
    ("agent_audit_event", ("createdAt",)), ("agent_token_use", ("lastUsedAt",))) for column in columns]
BAD_TIMES_SQL = " UNION ALL ".join(
    f"""SELECT '{table}."{column}"' AS what, count(*) FROM {{s}}.{table} WHERE NOT {{s}}.agent_time_ok("{column}")"""
    for table, column in BAD_TIMES) + """
UNION ALL SELECT 'agent_token."expiresAt" before "createdAt"', count(*) FROM {s}.agent_token
          WHERE "expiresAt" <= "createdAt"
"""


# --- Commands ---------------------------------------------------------------
#
# Each command takes the parsed arguments (and a connection, for the ones
# that need the database) and returns the result object that --json prints.


def identity_view(identity: dict, workspace_public_id: str) -> dict:
    return {
        "publicId": identity.get("publicId"),
        "slug": identity["slug"],
        "displayName": identity["displayName"],
        "status": identity["status"],
        "workspacePublicId": workspace_public_id,
        "createdAt": iso(identity.get("createdAt")),
        "updatedAt": iso(identity.get("updatedAt")),
        "pausedAt": iso(identity.get("pausedAt")),
        "revokedAt": iso(identity.get("revokedAt")),
    }


def token_view(token: dict, now: datetime) -> dict:
    """A token as inspect shows it: never its hash."""
    live = is_live(token, now)
    return {
        "publicId": token["publicId"],
        "name": token["name"],
        "scopes": list(token["scopes"]),
        "createdAt": iso(token["createdAt"]),
        "expiresAt": iso(token["expiresAt"]),
        "lastUsedAt": iso(token["lastUsedAt"]),
        "revokedAt": iso(token["revokedAt"]),
        "rotatedFromPublicId": token["rotatedFromPublicId"],
        "live": live,
        "expiringSoon": live and expiring_soon(token["expiresAt"], now),
    }


def is_live(token: dict, now: datetime) -> bool:
    return token["revokedAt"] is None and (token["expiresAt"] is None or token["expiresAt"] > now)


def expiring_soon(expires_at: datetime | None, now: datetime) -> bool:
    return expires_at is not None and expires_at - now <= EXPIRING_SOON


def expiry_warning(token_public_id: str, slug: str, expires_at: datetime, now: datetime) -> str:
    return f"warning: token {token_public_id} of agent identity {slug} expires {relative(expires_at, now)} ({iso(expires_at)})"


def issued_lifetime(token: dict) -> Duration:
    """The lifetime a token was issued with: its issuing event's --expires-in, else (a token
    from before that was recorded) its expiry less its creation, in whole days, or never."""
    with contextlib.suppress(argparse.ArgumentTypeError, TypeError):
        return parse_expires_in(token["issuedFor"])
    if token["expiresAt"] is None:
        return parse_expires_in("never")
    days = (token["expiresAt"] - token["createdAt"]).total_seconds() / 86400
    return parse_expires_in(f"{min(max(round(days), 1), EXPIRES_MAX.days)}d")


def expires_at(expiry: Duration, now: datetime) -> datetime | None:
    return None if expiry.delta is None else now + expiry.delta


def mutation_result(args: argparse.Namespace, changed: bool, **fields) -> dict:
    return {"ok": True, "command": args.command, "dryRun": args.dry_run, "changed": changed, **fields}


def cmd_help(args: argparse.Namespace) -> dict:
    """Print usage, for the whole tool or one command."""
    parser = args.parser
    if args.topic is None:
        text = parser.format_help()
    elif args.topic in parser.commands:
        text = parser.commands[args.topic].format_help()
    else:
        raise AdminError(
            EXIT_USAGE, f"no command {args.topic[:80]!r}; commands: {', '.join(parser.commands)}"
        )
    return {"ok": True, "command": "help", "text": text}


def cmd_schema(args: argparse.Namespace) -> dict:
    """Print the DDL of the agent tables."""
    return {"ok": True, "command": "schema", "sql": schema_sql(pinned_schema(args) or DB_SCHEMA_DEFAULT)}


def completion_spec(parser) -> dict[str, dict[str, tuple[str, ...] | None]]:
    """Every command's long options, from the parser itself: an option maps to the values
    it takes (choices, COMPLETED_VALUES), () for a value to type (a file for PATH), None
    for a flag; a positional's words (help's: the commands) are offered as flags are."""
    spec = {}
    for name, sub in parser.commands.items():
        options: dict[str, tuple[str, ...] | None] = {}
        for action in sub._actions:
            if not action.option_strings:  # a positional: offer its choices as words
                words = COMMANDS if action.metavar == "COMMAND" else action.choices or ()
                options.update(dict.fromkeys(words, None))
            for option in (o for o in action.option_strings if o.startswith("--")):
                if action.nargs == 0:
                    options[option] = None
                else:
                    options[option] = tuple(COMPLETED_VALUES.get(option) or action.choices or ())
        spec[name] = options
    return spec


# The values completion offers where the parser checks them itself rather than by choices.
COMPLETED_VALUES = {"--scopes": SCOPES, "--action": AUDIT_ACTIONS}
FILE_OPTIONS = ("--token-file", "--expect-heads", "--file")

BASH_COMPLETION = """\
# agent-identity {version}: bash completion, made from its own parser.
# Install: agent-identity completion bash > ~/.local/share/bash-completion/completions/agent-identity
_agent_identity() {{
    # The word being completed, read from the line itself: bash splits words at ':',
    # which every scope has.
    local line="${{COMP_LINE:0:COMP_POINT}}"
    local cur="${{line##*[[:space:]]}}"
    local words=(${{line% *}}) command="" prev="" word
    [[ "$line" == *[[:space:]] ]] && cur="" && words=(${{line}})
    prev="${{words[${{#words[@]}}-1]}}"
    for word in "${{words[@]:1}}"; do
        case " {commands} " in *" $word "*) command="$word"; break;; esac
    done
    local values="" options=""
    case "$command" in
{option_cases}
        *) values="{commands} --help --version"; options="";;
    esac
    if [[ -n "$command" ]]; then
        case "$prev" in
{value_cases}
            *) values="$options";;
        esac
    fi
    if [[ "$values" == FILE ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
        return
    fi
    local prefix=""
    [[ "$prev" == --scopes && "$cur" == *,* ]] && prefix="${{cur%,*}}," && cur="${{cur##*,}}"
    COMPREPLY=($(compgen -W "$values" -P "$prefix" -- "$cur"))
    # Hand back only what follows the last ':' of the word, as bash expects.
    local colon="${{prefix}}${{cur}}"
    colon="${{colon%"${{colon##*:}}"}}"
    [[ -n "$colon" ]] && COMPREPLY=("${{COMPREPLY[@]#"$colon"}}")
}}
complete -o default -F _agent_identity agent-identity
"""


def completion_script(shell: str, parser) -> str:
    """A completion script for bash, zsh or fish, generated from the parser: commands,
    their options, and the values an option takes (statuses, scopes, files)."""
    spec = completion_spec(parser)
    commands = " ".join(spec)
    if shell in ("bash", "zsh"):
        option_cases = "\n".join(f'        {name}) options="{" ".join(options)}";;' for name, options in spec.items())
        values = {option: vals for options in spec.values() for option, vals in options.items() if vals}
        value_cases = [f'            {" | ".join(FILE_OPTIONS)}) values=FILE;;']
        value_cases += [f'            {option}) values="{" ".join(vals)}";;' for option, vals in values.items()
                        if option not in FILE_OPTIONS]
        takes = sorted({option for options in spec.values() for option, vals in options.items()
                        if vals == () and option not in FILE_OPTIONS})
        value_cases.append(f'            {" | ".join(takes)}) values="";;')
        script = BASH_COMPLETION.format(version=__version__, commands=commands, option_cases=option_cases,
                                        value_cases="\n".join(value_cases))
        if shell == "zsh":
            script = ("# zsh: through bash's completion system\nautoload -U +X bashcompinit && bashcompinit\n"
                      + script)
        return script
    lines = [f"# agent-identity {__version__}: fish completion, made from its own parser.",
             "# Install: agent-identity completion fish > ~/.config/fish/completions/agent-identity.fish",
             "complete -c agent-identity -f"]
    for name, sub in parser.commands.items():
        lines.append(f"complete -c agent-identity -n __fish_use_subcommand -a {name} -d {fish_quote(sub.description or '')}")
        for option, vals in spec[name].items():
            rule = f"complete -c agent-identity -n '__fish_seen_subcommand_from {name}' -l {option[2:]}"
            if option in FILE_OPTIONS:
                rule += " -r -F"
            elif vals:
                rule += f" -x -a {fish_quote(' '.join(vals))}"
            elif vals == ():
                rule += " -x"
            lines.append(rule)
    return "\n".join(lines) + "\n"


def fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def cmd_completion(args: argparse.Namespace) -> dict:
    """Print a shell completion script for bash, zsh or fish."""
    return {"ok": True, "command": "completion", "script": completion_script(args.shell, build_parser())}


class IssuedToken(collections.namedtuple("IssuedToken", "public_id secret hash")):
    """A new token: its public id, the whole secret token string, and its argon2 hash."""

    __slots__ = ()


def issue_token() -> IssuedToken:
    """A new token and its hash, made before the transaction so no lock waits on argon2."""
    public_id = new_public_id()
    secret = new_token(public_id)
    return IssuedToken(public_id, secret, hash_token(secret))


@contextlib.contextmanager
def token_file(path: str | None, dry_run: bool):
    """Where a new token goes: None for stdout, else a file descriptor.

    The file is created (mode 0600, never over an existing file or through a
    link) before the transaction, so a refusal writes nothing; it is removed
    again if anything fails before the token is in it.
    """
    if path is None or path == "-":
        yield None
        return
    exists = f"token file {quote(path)} exists; a token file is never overwritten"
    if dry_run:
        if os.path.lexists(path):
            raise AdminError(EXIT_CONFLICT, exists)
        yield None
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise AdminError(EXIT_CONFLICT, exists) from None
    except OSError as exc:
        raise AdminError(EXIT_USAGE, f"cannot create token file {quote(path)}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        yield fd
    except BaseException:
        # Whatever failed, the file holds no whole token: an empty file would only
        # block the retry.
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def write_token_file(fd: int | None, issued: IssuedToken | None, args: argparse.Namespace) -> None:
    """Put the committed token in its file; the change is already in the database.

    Any failure here (a full disk, a file size limit, a signal) is reported as what it
    is: committed, with the token lost (token_file() then removes the file).
    """
    if fd is None or issued is None:
        return
    data = (issued.secret + "\n").encode("ascii")
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except (OSError, KeyboardInterrupt) as exc:
        raise undelivered(args.command, f"the token could not be written to {quote(args.token_file)}", exc) from None


def token_result(issued: IssuedToken | None, name: str, scopes: list[str], expires: datetime | None,
                 file: str | None, **extra) -> dict:
    """The token part of create's and rotate's result: the secret, or where it went
    (--token-file - is standard output, alone: the secret and where it goes)."""
    token = {"publicId": issued and issued.public_id, "name": name, "scopes": scopes,
             "expiresAt": iso(expires), **extra}
    if file is not None and (issued or file == "-"):
        token["tokenFile"] = file
    if issued and file in (None, "-"):
        token["secret"] = issued.secret
    return token


def slug_taken(slug: str, workspace_public_id: str) -> AdminError:
    return AdminError(
        EXIT_CONFLICT,
        f"the slug {slug} is taken in workspace {workspace_public_id} "
        "(slugs are never reused, revoked identities included)",
    )


def cmd_create(db: Database, args: argparse.Namespace) -> dict:
    """Create an active identity and its first token."""
    from psycopg import errors

    issued = None if args.dry_run else issue_token()
    identity = {
        "publicId": None if args.dry_run else new_public_id(),
        "slug": args.slug,
        "displayName": args.display_name,
        "status": "active",
    }
    with token_file(args.token_file, args.dry_run) as fd:
        try:
            with db.transaction() as session:
                access = access_of(db, session, args, lock=True, must_exist=False)
                if access["identity"] is not None:
                    raise slug_taken(args.slug, access["workspace_public_id"])
                expires = expires_at(args.expires_in, access["now"])
                audit = audit_params(args, access, "identity.created", {
                    "previousStatus": None,
                    "newStatus": "active",
                    "slug": args.slug,
                    "displayName": args.display_name,
                    "scopes": args.scopes,
                    "tokenPublicId": issued and issued.public_id,
                    "tokenHashDigest": issued and hash_digest(issued.hash),
                    "tokenName": args.token_name,
                    "expiresIn": args.expires_in.text,
                    "expiresAt": iso(expires),
                })
                if issued:
                    identity = write(db.conn, session, CREATE_SQL, {
                        **audit,
                        "identity_public_id": identity["publicId"],
                        "slug": args.slug,
                        "display_name": args.display_name,
                        "token_public_id": issued.public_id,
                        "token_name": args.token_name,
                        "token_hash": issued.hash,
                        "scopes": args.scopes,
                        "expires_at": expires,
                    })
        except errors.UniqueViolation as exc:
            # Another run took the slug between our check and our insert.
            if exc.diag.constraint_name == "agent_identity_workspace_slug_unique":
                raise slug_taken(args.slug, access["workspace_public_id"]) from None
            raise
        write_token_file(fd, issued, args)
    return mutation_result(
        args,
        True,
        identity=identity_view(identity, access["workspace_public_id"]),
        token=token_result(issued, args.token_name, args.scopes, expires, args.token_file,
                           expiresIn=args.expires_in.text),
        auditEvent={"action": audit["action"], "metadata": audit["metadata"]},
    )


def cmd_rotate(db: Database, args: argparse.Namespace) -> dict:
    """Issue a new token with the same scopes; revoke the live ones, or let them run out the grace."""
    issued = None if args.dry_run else issue_token()
    with token_file(args.token_file, args.dry_run) as fd:
        with db.transaction() as session:
            access = access_of(db, session, args, lock=True, tokens=True)
            identity, now, tokens = access["identity"], access["now"], access["tokens"]
            slug = identity["slug"]
            if identity["status"] == "revoked":
                raise AdminError(
                    EXIT_CONFLICT, f"agent identity {slug} is revoked; a revoked identity gets no tokens"
                )
            if not tokens:
                raise AdminError(EXIT_CONFLICT, f"agent identity {slug} has no token to rotate")
            # The token the new one follows: the newest live one, else the newest.
            source = next((t for t in tokens if is_live(t, now)), tokens[0])
            token_name = args.token_name or source["name"]
            previous_scopes = list(source["scopes"])
            scopes = args.scopes or previous_scopes
            # Unless told, the new token lives as long as the one it follows was issued to.
            lifetime = args.expires_in or issued_lifetime(source)
            expires = expires_at(lifetime, now)
            if args.grace.delta:
                grace_until = now + args.grace.delta
                retired = []
                graced = [
                    (t, min(t["expiresAt"], grace_until) if t["expiresAt"] else grace_until)
                    for t in tokens if is_live(t, now)
                ]
            else:
                grace_until = None
                retired = [t for t in tokens if t["revokedAt"] is None]
                graced = []
            audit = audit_params(args, access, "identity.token_rotated", {
                "previousStatus": identity["status"],
                "newStatus": identity["status"],
                "scopes": scopes,
                "previousScopes": previous_scopes,
                "tokenPublicId": issued and issued.public_id,
                "tokenHashDigest": issued and hash_digest(issued.hash),
                "tokenName": token_name,
                "expiresIn": lifetime.text,
                "lifetimeKeptFromRotatedToken": args.expires_in is None,
                "expiresAt": iso(expires),
                "rotatedFromTokenPublicId": source["publicId"],
                "revokedTokenPublicIds": [t["publicId"] for t in retired],
                "grace": args.grace.text,
                "gracedTokens": [{"publicId": t["publicId"], "expiresAt": iso(until)} for t, until in graced],
            })
            if issued:
                identity = write(db.conn, session, ROTATE_SQL, {
                    **audit,
                    "identity_id": identity["id"],
                    "identity_ids": [identity["id"]],
                    "revoke_token_ids": [t["id"] for t in retired],
                    "grace_token_ids": [t["id"] for t, _ in graced],
                    "grace_until": grace_until,
                    "token_public_id": issued.public_id,
                    "token_name": token_name,
                    "token_hash": issued.hash,
                    "scopes": scopes,
                    "expires_at": expires,
                    "rotated_from_id": source["id"],
                })
        write_token_file(fd, issued, args)
    metadata = audit["metadata"]
    return mutation_result(
        args,
        True,
        identity=identity_view(identity, access["workspace_public_id"]),
        token=token_result(issued, token_name, scopes, expires, args.token_file,
                           rotatedFromPublicId=source["publicId"], expiresIn=lifetime.text,
                           lifetimeKept=args.expires_in is None, previousScopes=previous_scopes),
        revokedTokenPublicIds=metadata["revokedTokenPublicIds"],
        gracedTokens=metadata["gracedTokens"],
        auditEvent={"action": audit["action"], "metadata": metadata},
    )


def cmd_revoke(db: Database, args: argparse.Namespace) -> dict:
    """revoke: one token with --token, else the whole identity."""
    return cmd_revoke_token(db, args) if args.token else cmd_set_status(db, args)


def cmd_revoke_token(db: Database, args: argparse.Namespace) -> dict:
    """Revoke one token of an identity, leaving the identity and its other tokens alone."""
    with db.transaction() as session:
        access = access_of(db, session, args, lock=True, tokens=True)
        identity = access["identity"]
        slug, workspace = identity["slug"], access["workspace_public_id"]
        token = next((t for t in access["tokens"] if t["publicId"] == args.token), None)
        if token is None:
            raise AdminError(EXIT_NOT_FOUND, f"agent identity {slug} has no token {args.token}")
        if token["revokedAt"] is not None:
            return mutation_result(
                args, False, identity=identity_view(identity, workspace),
                message=f"token {args.token} of agent identity {slug} is already revoked; nothing to change",
            )
        audit = audit_params(args, access, "identity.token_revoked", {
            "previousStatus": identity["status"],
            "newStatus": identity["status"],
            "revokedTokenPublicIds": [token["publicId"]],
        })
        if not args.dry_run:
            identity = write(db.conn, session, REVOKE_TOKEN_SQL, {
                **audit, "identity_id": identity["id"], "identity_ids": [identity["id"]], "token_id": token["id"],
                "revoke_token_ids": [token["id"]],
            })
    return mutation_result(
        args,
        True,
        identity=identity_view(identity, workspace),
        revokedTokenPublicIds=[token["publicId"]],
        auditEvent={"action": audit["action"], "metadata": audit["metadata"]},
    )


def cmd_set_status_all(db: Database, args: argparse.Namespace) -> dict:
    """pause, resume and revoke --all: every identity of the workspace the move applies
    to, in one transaction, with one audit event each, sharing a batch id."""
    from psycopg.types.json import Jsonb

    new_status, allowed_from, action = TRANSITIONS[args.command]
    undoes = getattr(args, "batch", None)
    params = {"from_statuses": list(allowed_from), "batch": undoes}
    with db.transaction() as session:
        access = access_of(db, session, args, lock=True, params=params, detail=compose(
            BULK_TARGETS, session.schema, workspace_id='(SELECT "id" FROM ws WHERE NOT deleted)'))
        targets, workspace = access["detail"], access["workspace_public_id"]
        if access["stale"]:
            # The workspace changed while we waited for its turn: read what it holds now.
            targets = db.conn.execute(compose(BULK_TARGETS_SQL, session.schema, workspace_id="%(workspace_id)s"),
                                   dict(params, workspace_id=access["workspace_id"])).fetchone()[0]
        if not targets:
            return nothing_to_move(db, session, args, access, allowed_from)
        batch = {"batchId": None if args.dry_run else new_public_id(), "batchCount": len(targets),
                 **({"undoesBatchId": undoes} if undoes else {})}
        events = [{
            "publicId": new_public_id(),
            "identityId": target["id"],
            "metadata": event_metadata({
                "previousStatus": target["status"], "newStatus": new_status,
                "revokedTokenPublicIds": [t["publicId"] for t in target["tokens"]] if new_status == "revoked" else [],
                **batch,
            }),
        } for target in targets]
        if not args.dry_run:
            moved, written = db.conn.execute(compose(BULK_SQL, session.schema), {
                "identity_ids": [t["id"] for t in targets], "status": new_status,
                "revoke_token_ids": [token["id"] for t in targets for token in t["tokens"]]
                if new_status == "revoked" else [],
                "actor_id": access["actor_id"], "actor_email": access["actor_email"], "reason": args.reason,
                "workspace_id": access["workspace_id"], "action": action, "events": Jsonb(events),
            }).fetchone()
            if written != len(events):
                raise dropped_events(len(events), written)
    return mutation_result(
        args, True, workspacePublicId=workspace, batchId=batch["batchId"],
        identities=[{"publicId": t["publicId"], "slug": t["slug"], "previousStatus": t["status"],
                     "status": new_status} for t in targets],
        revokedTokenPublicIds=[token for event in events for token in event["metadata"]["revokedTokenPublicIds"]],
        auditEvent={"action": action, "metadata": dict(batch, count=len(events))},
    )


def nothing_to_move(db: Database, session: Session, args: argparse.Namespace, access: dict,
                    allowed_from: tuple[str, ...]) -> dict:
    """--all or --batch found no identity to move: nothing to change, or (--batch) exit 3
    for a batch that never was."""
    workspace = access["workspace_public_id"]
    batch = getattr(args, "batch", None)
    if batch is None:
        return mutation_result(args, False, identities=[], message=(
            f"no agent identity in workspace {workspace} is {' or '.join(allowed_from)}; nothing to change"))
    if not db.conn.execute(compose(BATCH_EXISTS_SQL, session.schema),
                           {"workspace_id": access["workspace_id"], "batch": batch}).fetchone()[0]:
        raise AdminError(EXIT_NOT_FOUND, f"no pause --all batch {batch} in workspace {workspace}")
    return mutation_result(args, False, identities=[], message=(
        f"no identity batch {batch} paused is still paused by it in workspace {workspace}; nothing to change"))


def cmd_set_status(db: Database, args: argparse.Namespace) -> dict:
    """pause, resume and revoke: move an identity to another status (or, with --all or
    resume's --batch, every one that move applies to)."""
    if args.all or getattr(args, "batch", None):
        return cmd_set_status_all(db, args)
    new_status, allowed_from, action = TRANSITIONS[args.command]
    with db.transaction() as session:
        access = access_of(db, session, args, lock=True, tokens=new_status == "revoked")
        identity = access["identity"]
        slug, workspace, previous = identity["slug"], access["workspace_public_id"], identity["status"]
        if previous == new_status:
            return mutation_result(
                args, False, identity=identity_view(identity, workspace),
                message=f"agent identity {slug} is already {new_status}; nothing to change",
            )
        if previous not in allowed_from:
            raise AdminError(
                EXIT_CONFLICT,
                f"cannot {args.command} agent identity {slug}: it is {previous}"
                + (" and revocation is final" if previous == "revoked" else ""),
            )
        revoked_tokens = [t for t in access["tokens"] if t["revokedAt"] is None]
        metadata = {
            "previousStatus": previous,
            "newStatus": new_status,
            "revokedTokenPublicIds": [t["publicId"] for t in revoked_tokens],
        }
        audit = audit_params(args, access, action, metadata)
        if args.dry_run:
            identity = dict(identity, status=new_status)  # its times come only with a real run
        else:
            identity = write(db.conn, session, STATUS_SQL, {
                **audit,
                "identity_id": identity["id"],
                "identity_ids": [identity["id"]],
                "status": new_status,
                "revoke_token_ids": [t["id"] for t in revoked_tokens],
            })
    return mutation_result(
        args,
        True,
        identity=identity_view(identity, workspace),
        previousStatus=previous,
        revokedTokenPublicIds=metadata["revokedTokenPublicIds"],
        auditEvent={"action": action, "metadata": audit["metadata"]},
    )


def cmd_inspect(db: Database, args: argparse.Namespace) -> dict:
    """Show an identity, its tokens (never their hashes) and its latest events."""
    with db.transaction(read_only=True) as session:
        access = access_of(db, session, args, tokens=True, detail=EVENTS_DETAIL, params={"events": args.events})
    identity, now, tokens = access["identity"], access["now"], access["tokens"]
    view = identity_view(identity, access["workspace_public_id"])
    view["tokens"] = [token_view(t, now) for t in tokens]
    view["events"] = [
        {
            "publicId": e["publicId"],
            "action": e["action"],
            "actorEmail": e["actorEmail"],
            "reason": e["reason"],
            "tokenPublicId": e["tokenPublicId"],
            "metadata": e["metadata"],
            "createdAt": iso(e["createdAt"]),
        }
        for e in map(json_times, access["detail"])
    ]
    view["down"] = identity["status"] == "active" and not any(is_live(t, now) for t in tokens)
    warnings = [
        expiry_warning(t["publicId"], identity["slug"], t["expiresAt"], now)
        for t in tokens if is_live(t, now) and expiring_soon(t["expiresAt"], now)
    ] + ([down_warning(identity["slug"])] if view["down"] else [])
    return {"ok": True, "command": "inspect", "now": iso(now), "identity": view, "warnings": warnings}


def down_warning(slug: str) -> str:
    """An active identity with no live token: its agent cannot reach Kan, and nothing fails loudly."""
    return f"warning: agent identity {slug} is active with no live token: its agent cannot reach Kan; rotate it"


def keyset_page(detail: dict, key: str, limit: int, missing_cursor: str) -> tuple[list[dict], str | None]:
    """The rows of a page the database read one row past (list's, audit's), their times
    parsed, and the --after of the next page (None on the last); exit 3 with
    missing_cursor when the --after given names nothing."""
    if not detail["cursorFound"]:
        raise AdminError(EXIT_NOT_FOUND, missing_cursor)
    rows = [json_times(row) for row in detail[key]]
    return rows[:limit], rows[limit - 1]["publicId"] if len(rows) > limit else None


def cmd_list(db: Database, args: argparse.Namespace) -> dict:
    """List a workspace's identities, newest first, a page at a time."""
    with db.transaction(read_only=True) as session:
        access = access_of(db, session, args, detail=LIST_DETAIL, params={
            "status": args.status, "limit": args.limit + 1, "after": args.after, "within": EXPIRING_SOON,
            "superseded": False,
        })
    page, workspace = access["detail"], access["workspace_public_id"]
    rows, next_cursor = keyset_page(page, "identities", args.limit,
                                    f"no agent identity {args.after} in workspace {workspace}")
    now = access["now"]
    identities = [
        dict(
            identity_view(row, workspace),
            liveTokens=row["liveTokens"],
            nextExpiresAt=iso(row["nextExpiresAt"]),
            expiringSoon=expiring_soon(row["nextExpiresAt"], now),
            lastUsedAt=iso(row["lastUsedAt"]),
            down=row["status"] == "active" and not row["liveTokens"],
        )
        for row in rows
    ]
    # Warnings cover the whole workspace, not only this page: each identity's soonest.
    soonest = {}
    for token in map(json_times, page["expiring"]):
        soonest.setdefault(token["slug"], token["expiresAt"])
    warnings = [
        f"warning: agent identity {slug} has a live token that expires {relative(expires, now)} ({iso(expires)})"
        for slug, expires in soonest.items()
    ] + [down_warning(i["slug"]) for i in identities if i["down"]]
    return {
        "ok": True, "command": "list", "now": iso(now), "workspacePublicId": workspace,
        "identities": identities, "nextCursor": next_cursor, "warnings": warnings,
    }


def cmd_workspaces(db: Database, args: argparse.Namespace) -> dict:
    """The workspaces the actor may manage, by the access check's rule, with what each holds."""
    from psycopg.rows import dict_row

    with db.transaction(read_only=True) as session:
        rows = db.conn.cursor(row_factory=dict_row).execute(
            compose(WORKSPACES_SQL, session.schema),
            {"email": db.actor, "permission": MANAGE_PERMISSION}).fetchall()
    return {"ok": True, "command": "workspaces", "actorEmail": db.actor, "workspaces": [
        {"publicId": row["publicId"], "slug": row["slug"], "name": row["name"],
         "identities": {status: row[status] for status in STATUSES},
         "liveTokens": row["liveTokens"], "nextExpiresAt": iso(row["nextExpiresAt"])}
        for row in rows
    ]}


def cmd_expiring(db: Database, args: argparse.Namespace) -> dict:
    """Live tokens expiring within --within, and active identities with no live token, in
    every workspace the actor manages (or one). Checking nothing is never success: an
    actor who is no Kan user, or manages no workspace, is refused."""
    params = {"permission": MANAGE_PERMISSION, "within": args.within.delta,
              "superseded": args.include_superseded}
    with db.transaction(read_only=True) as session:
        found, now = judged_detail(db, session, args, EXPIRING_DETAIL, EXPIRING_SQL, params)
    return {"ok": True, "command": "expiring", "now": iso(now), "within": args.within.text, "tokens": [
        {"workspacePublicId": t["workspacePublicId"], "workspaceSlug": t["workspaceSlug"], "slug": t["slug"],
         "identityPublicId": t["identityPublicId"], "publicId": t["publicId"], "name": t["name"],
         "expiresAt": iso(t["expiresAt"]), "superseded": t["superseded"]}
        for t in map(json_times, found["tokens"])
    ], "down": [
        {"workspacePublicId": d["workspacePublicId"], "workspaceSlug": d["workspaceSlug"], "slug": d["slug"],
         "identityPublicId": d["identityPublicId"], "lastExpiredAt": iso(d["lastExpiredAt"])}
        for d in map(json_times, found["down"])
    ], "checked": {"workspaces": found["workspaces"], "identities": found["identities"]}}


def judged_detail(db: Database, session: Session, args: argparse.Namespace, detail: str, across: str,
                  params: dict) -> tuple[dict, datetime]:
    """What a judging command reads, and the transaction's time: in the one workspace the
    arguments name, with its access check (detail), or across every workspace the actor
    manages (across), refused when that is none."""
    params = dict(params, email=db.actor)  # (known once the transaction began: the login's user, or the claim)
    if Ref.of(args).workspace:
        access = access_of(db, session, args, detail=detail, params=params)
        return access["detail"], access["now"]
    found, now, known = db.conn.execute(compose(across, session.schema), params).fetchone()
    refuse_unchecked(db.actor, known, found["workspaces"])
    return found, now


def refuse_unchecked(actor: str, known: bool, workspaces: int) -> None:
    """A judgement across the workspaces an actor manages, for an actor who is no Kan user
    or manages none, would check nothing: exit 4, never a green "nothing found" (a
    mistyped AGENT_IDENTITY_ADMIN_EMAIL in a cron job). There is no workspace whose audit
    log could record it."""
    if not known:
        raise AdminError(EXIT_FORBIDDEN, f"no Kan user has the email {quote(actor)}: nothing was checked")
    if not workspaces:
        raise AdminError(EXIT_FORBIDDEN, f"{quote(actor)} manages no workspace: nothing was checked")


def cmd_review(db: Database, args: argparse.Namespace) -> dict:
    """An access review: every active or paused identity (with --include-revoked, every
    one) of the workspaces the actor manages (or one), what it holds, who made it, when
    it was used, and its findings, each with the command that deals with it. It judges,
    so it fails closed as expiring does."""
    params = {"permission": MANAGE_PERMISSION, "longest": EXPIRES_MAX,
              "idle": args.idle.delta, "max_age": args.max_age.delta,
              "statuses": list(STATUSES) if args.include_revoked else ["active", "paused"]}
    with db.transaction(read_only=True) as session:
        found, now = judged_detail(db, session, args, REVIEW_DETAIL, REVIEW_SQL, params)
    identities = [review_view(row) for row in found["identities"]]
    return {"ok": True, "command": "review", "now": iso(now), "idle": args.idle.text, "maxAge": args.max_age.text,
            "identities": identities,
            "checked": {"workspaces": found["workspaces"], "identities": len(identities)}}


# What REVIEW_DETAIL says of each identity, in its order (an array a row: half the
# bytes of an object to build, send and parse, at 10,000 identities).
REVIEW_COLUMNS = ("workspacePublicId", "workspaceSlug", "slug", "publicId", "status", "createdAt", "createdBy",
                  "liveTokens", "scopes", "newestTokenAt", "nextExpiry", "lastUsedAt", "findings")


def review_view(values: list) -> dict:
    """One identity of review as it prints it, with the command for each finding the query judged."""
    row = dict(zip(REVIEW_COLUMNS, values))
    row["scopes"] = sorted(set(row["scopes"].split(","))) if row["scopes"] else []  # its live tokens', joined
    row["actions"] = [review_action(finding, row["workspacePublicId"], row["slug"], row["status"])
                      for finding in row["findings"]]
    return row


def review_action(finding: str, workspace: str, slug: str, status: str) -> str:
    """The command that deals with a finding, by the workspace's public id and the identity's
    slug, quoted for a shell whatever a hand stored in them; a rotation writes its token to
    standard output, for a pipe into the secret manager."""
    import shlex

    command, extra, _ = REVIEW_FINDINGS[finding]
    if finding == "unused" and status == "paused":
        command = "revoke"
    return (f"{PROG} {command} --workspace-public-id {shlex.quote(workspace)} --slug {shlex.quote(slug)}"
            f"{' ' + extra if extra else ''} "
            f"--reason \"access review: {finding}\" --confirm")


def event_view(event: dict, workspace: str) -> dict:
    """An audit event as audit prints it (and --jsonl streams it: each line whole), with
    every value its chain hash covers, as stored: its time to the microsecond, the stable
    public ids, and the metadata's text (metadataText) beside the metadata itself. An
    export of them is verified with no database: audit verify --file."""
    return {
        "publicId": event["publicId"],
        "createdAt": event["createdAt"] and chain_time(event["createdAt"]),
        "workspacePublicId": event["workspacePublicId"] or workspace,  # (an unchained event has no copy of its own)
        "action": event["action"],
        "actorEmail": event["actorEmail"],
        "actorUserUuid": event["actorUserUuid"],
        "login": event["login"],  # the database login that wrote it (null: written before 0.5.0)
        "identityPublicId": event["identityPublicId"],
        "slug": event["identitySlug"],
        "tokenPublicId": event["tokenPublicId"],
        "reason": event["reason"],
        "metadata": event["metadata"],
        "metadataText": event["metadataText"],
        "sequence": event["sequence"],  # its place in the workspace's audit chain, the hash it links to, its hash
        "previousHash": event["previousHash"],
        "hash": event["hash"],
    }


def audit_page(db: Database, args: argparse.Namespace, after, limit: int, ref: Ref | None = None) -> dict:
    """One page of audit's events after the one named by after, in a read-only
    transaction of its own: the access check and the page in one query. Newest first,
    after an event's public id; or, in chain order (--after-sequence, an export), after a
    sequence number. A --token names the workspace when none is given, and stays a
    filter on that token."""
    ref = ref or Ref.of(args)
    if in_chain_order(args):
        detail, params = CHAIN_PAGE_DETAIL, {"after_sequence": after or 0, "limit": limit + 1}
    else:
        moments = {f"{bound}_{part}": getattr(getattr(args, bound), part, None)
                   for bound in ("since", "until") for part in ("ago", "at")}
        detail, params = AUDIT_DETAIL, dict(moments, after=after, limit=limit + 1, token_filter=args.token,
                                            actor=args.actor, actions=args.action)
        if ref.workspace:  # a token is a filter there, which the chain answers even once Kan deleted the token
            ref = ref._replace(token=None)
    with db.transaction(read_only=True) as session:
        access = access_of(db, session, args, ref, detail=detail, params=params, must_exist=False)
    workspace, found = access["workspace_public_id"], access["detail"]
    if not found.get("identityKnown", True):
        with db.transaction(read_only=True) as session:
            hint = did_you_mean(args.slug, slugs_in(db.conn, session, access["workspace_id"]))
        raise AdminError(EXIT_NOT_FOUND, f"no agent identity {args.slug} in workspace {workspace}{hint}")
    if not found.get("tokenKnown", True):
        raise AdminError(EXIT_NOT_FOUND, f"no token {args.token} in workspace {workspace}")
    events, next_cursor = keyset_page(found, "events", limit, f"no audit event {after} in workspace {workspace}")
    if detail is CHAIN_PAGE_DETAIL and next_cursor:
        next_cursor = f"{workspace}:{events[-1]['sequence']}"
    elif detail is CHAIN_PAGE_DETAIL:  # the chain's end: then what has no place in it
        events += [json_times(event) for event in found["unchained"]]
    return {"now": access["now"], "workspacePublicId": workspace,
            "events": [event_view(event, workspace) for event in events], "nextCursor": next_cursor}


def in_chain_order(args: argparse.Namespace) -> bool:
    """Whether audit lists in chain order, oldest first (--after-sequence, or the export
    of every workspace), rather than newest first."""
    return args.after_sequence is not None or not (Ref.of(args).workspace or args.token)


def later_pages(db: Database, args: argparse.Namespace, pages):
    """audit --all: the pages after the first (pages yields them, each read in a
    transaction of its own, so a slow reader holds no snapshot, lock or idle transaction
    open); then it closes the connection, which it owns from the first page on."""
    import psycopg

    try:
        yield from pages
    except AccessDenied as denied:  # the actor lost workspace:manage mid-way
        record_denial(db, args, denied)
        raise
    except psycopg.Error as exc:
        raise database_error(exc, db.lock_timeout, target_of(db.conn)) from exc
    finally:
        db.conn.close()


def pages_after(db: Database, args: argparse.Namespace, page: dict, limit: int, ref: Ref | None = None):
    """The events of the pages after page, a page at a time."""
    while page["nextCursor"]:
        cursor = page["nextCursor"]
        page = audit_page(db, args, int(cursor.rpartition(":")[2]) if ":" in cursor else cursor, limit, ref)
        yield page["events"]


def exported_pages(db: Database, args: argparse.Namespace, workspaces: list[dict], limit: int):
    """audit --jsonl --all with no workspace: every workspace's chain in turn, oldest
    event first, each from the sequence --after-sequence gives it."""
    starts = {position.workspace: position.sequence for position in args.after_sequence or ()}
    for workspace in workspaces:
        ref = Ref(workspace["publicId"], False, None, None)
        page = audit_page(db, args, starts.get(workspace["publicId"], 0), limit, ref)
        yield page["events"]
        yield from pages_after(db, args, page, limit, ref)


def cmd_audit(db: Database, args: argparse.Namespace) -> dict:
    """The workspace's audit events, newest first (or, with --after-sequence, in chain
    order), a page at a time; with --all (and --jsonl), every page, streamed as it is
    read; with no workspace, every chain the actor manages. audit head and audit verify:
    its chains."""
    if args.mode:
        return {"head": cmd_audit_head, "verify": cmd_audit_verify}[args.mode](db, args)
    limit = args.limit or (LIST_LIMIT_MAX if args.all else LIST_LIMIT_DEFAULT)
    if not (Ref.of(args).workspace or args.token):  # the export of every workspace the actor manages
        with db.transaction(read_only=True) as session:
            workspaces, now = chain_workspaces(db, session, args), session.now
        strays = {p.workspace for p in args.after_sequence or ()} - {w["publicId"] for w in workspaces}
        if strays:  # a shipper's position for a workspace not exported would silently start it over
            raise AdminError(EXIT_USAGE, f"--after-sequence names {', '.join(sorted(strays))}, not a workspace you "
                                         "manage: nothing of it is exported")
        return {"ok": True, "command": "audit", "now": iso(now), "workspacePublicId": None, "events": [],
                "nextCursor": None, "later": later_pages(db, args, exported_pages(db, args, workspaces, limit)),
                "checked": checked(workspaces)}
    position = args.after_sequence[0] if args.after_sequence else None
    page = audit_page(db, args, position.sequence if position else args.after, limit)
    if position and position.workspace not in (None, page["workspacePublicId"]):
        raise AdminError(EXIT_USAGE, f"--after-sequence {position} is of another workspace than "
                                     f"{page['workspacePublicId']}")
    result = {"ok": True, "command": "audit", "now": iso(page["now"]), "workspacePublicId": page["workspacePublicId"],
              "events": page["events"], "nextCursor": page["nextCursor"]}
    if position:
        result["cursorOption"] = "--after-sequence"
    if args.all:
        result["nextCursor"] = None
        if page["nextCursor"]:
            result["later"] = later_pages(db, args, pages_after(db, args, page, limit))  # run() leaves conn to it
    return result


def checked(workspaces: list[dict]) -> dict:
    """What a judgement across workspaces looked at: how many workspaces and identities."""
    return {"workspaces": len(workspaces), "identities": sum(w["head"]["identities"] for w in workspaces)}


def chain_workspaces(db: Database, session: Session, args: argparse.Namespace) -> list[dict]:
    """What audit head, audit verify and the export look at: the workspace given (after
    the access check), or every one the actor manages — exit 4 if that is none (checking
    nothing is never success); each with its public id, slug and chain head."""
    if Ref.of(args).workspace:
        access = access_of(db, session, args, detail=ONE_HEAD_DETAIL)
        return [{"id": access["workspace_id"], "publicId": access["workspace_public_id"],
                 "slug": access["detail"]["slug"], "head": access["detail"]["head"]}]
    known, workspaces = db.conn.execute(compose(MANAGED_HEADS_SQL, session.schema),
                                        {"email": db.actor, "permission": MANAGE_PERMISSION}).fetchone()
    refuse_unchecked(db.actor, known, len(workspaces))
    return workspaces


def cmd_audit_head(db: Database, args: argparse.Namespace) -> dict:
    """The head of each audit chain, as a pin (WORKSPACE:SEQUENCE:HASH) to keep somewhere
    the database's writers cannot reach; audit verify --expect-head checks the chain
    still holds it."""
    with db.transaction(read_only=True) as session:
        workspaces = chain_workspaces(db, session, args)
    heads = []
    for workspace in workspaces:
        head = json_times(workspace["head"])
        pin = Pin(workspace["publicId"], Head(head["sequence"], head["hash"])) if head["sequence"] else None
        heads.append({
            "workspacePublicId": workspace["publicId"], "slug": workspace["slug"],
            "sequence": head["sequence"], "hash": head["hash"], "head": pin and str(pin.head), "pin": pin and str(pin),
            "createdAt": chain_time(head["createdAt"]) if head["createdAt"] else None,
            "unchained": head["unchained"],
        })
    return {"ok": True, "command": "audit head", "workspaces": heads, "checked": checked(workspaces)}


def pins_for(args: argparse.Namespace, workspaces: list[str],
             spans: dict[str, set[int]] | None = None) -> tuple[dict[str, tuple[Head, ...]], list[str]]:
    """The pins --expect-head and --expect-heads give each workspace verified, and a note
    for the file pins left unchecked. A pin given by hand must fall on a workspace verified
    (one without its workspace needs the workspace named) and, for exports (spans: the
    sequences they hold), on an event they hold; a file's pins are taken where they fall,
    and must give at least one: a pin that is not checked is never a pass. Exit 2 else."""
    pinned: dict[str, list[Head]] = {}
    for pin in args.expect_head or ():
        workspace = pin.workspace or (workspaces[0] if Ref.of(args).workspace else None)
        if workspace is None:
            raise AdminError(EXIT_USAGE, f"--expect-head {pin} names no workspace: give it as WORKSPACE:SEQUENCE:HASH, "
                                         "as audit head prints it, or name one workspace (--workspace)")
        if workspace not in workspaces:
            raise AdminError(EXIT_USAGE, f"--expect-head {pin}: workspace {workspace} is not one verified here")
        if spans is not None and pin.head.sequence not in spans[workspace]:
            raise AdminError(EXIT_USAGE, f"--expect-head {pin}: no export given holds event {pin.head.sequence}")
        pinned.setdefault(workspace, []).append(pin.head)
    skipped: set[str] = set()
    for path in args.expect_heads or ():
        pins = read_pins(path)
        usable = [pin for pin in pins if pin.workspace in workspaces
                  and (spans is None or pin.head.sequence in spans[pin.workspace])]
        if not usable:
            raise AdminError(EXIT_USAGE, f"{quote(path)} pins no head of the workspace{'s' * (len(workspaces) != 1)} "
                                         "verified: nothing would be checked against it")
        skipped |= {pin.workspace for pin in pins if pin.workspace not in workspaces}
        for pin in usable:
            pinned.setdefault(pin.workspace, []).append(pin.head)
    notes = [f"pinned heads of {len(skipped)} workspace{'s' * (len(skipped) != 1)} not verified here were not "
             f"checked: {', '.join(sorted(skipped))}"] if skipped and not Ref.of(args).workspace else []
    return {workspace: tuple(heads) for workspace, heads in pinned.items()}, notes


def chain_result(reports: list[dict], **more) -> dict:
    """audit verify's result, from its workspaces' reports (the database's or the files')."""
    return {"ok": True, "command": "audit verify", "intact": all(r["intact"] for r in reports),
            "pinsChecked": sum(len(r["pins"]) for r in reports), "workspaces": reports, **more}


def cmd_audit_verify(db: Database, args: argparse.Namespace) -> dict:
    """Recompute every event's hash from the rows alone, in chain order, streamed, and say
    per workspace whether the chain is intact, its head, every break, and which pins were
    checked."""
    reports = []
    with db.transaction(read_only=True) as session:
        workspaces = chain_workspaces(db, session, args)
        pins, notes = pins_for(args, [w["publicId"] for w in workspaces])
        for workspace in workspaces:
            expect = pins.get(workspace["publicId"], ())
            report = verify_workspace(db.conn, session.schema, workspace["id"], expect, session.now + CLOCK_SLACK)
            reports.append({"workspacePublicId": workspace["publicId"], "slug": workspace["slug"], **report,
                            "pins": [str(head) for head in expect]})
    return chain_result(reports, warnings=notes, checked={"workspaces": len(reports),
                                                          "identities": sum(r["identities"] for r in reports)})


# audit verify --file: an export, verified with no database.

EXPORT_FIELDS = ("publicId", "sequence", "workspacePublicId", "action", "identityPublicId", "slug", "tokenPublicId",
                 "actorUserUuid", "actorEmail", "reason", "metadataText", "createdAt", "previousHash", "hash")
EXPORT_TIME_RE = LazyPattern(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
HASH_RE = LazyPattern(r"[0-9a-f]{64}")


def exported_event(line: str, where: str) -> dict:
    """One line of an audit --jsonl export as check_chain reads an event; exit 2 for a line
    that is not one (a field missing, or a value no export of the tool writes)."""
    import json

    try:
        event = json.loads(line)
    except ValueError:
        event = None
    missing = [field for field in EXPORT_FIELDS if field not in event] if isinstance(event, dict) else ["all"]
    if missing:
        raise AdminError(EXIT_USAGE, f"{where} is not an audit event of `{PROG} audit --jsonl` (no {missing[0]})")
    event.setdefault("login", None)  # (exports of 0.4.0 have none: their events are v1)
    texts = [field for field in (*EXPORT_FIELDS, "login") if field != "sequence"
             and not isinstance(event[field], (str, type(None)))]
    sequence = event["sequence"]
    if texts or not (sequence is None or (isinstance(sequence, int) and not isinstance(sequence, bool))) \
            or not EXPORT_TIME_RE.fullmatch(event["createdAt"] or "") \
            or not all(HASH_RE.fullmatch(event[field] or "") for field in ("previousHash", "hash") if sequence):
        raise AdminError(EXIT_USAGE, f"{where} is not an audit event of `{PROG} audit --jsonl` (its "
                                     f"{(texts or ['sequence, createdAt or hashes'])[0]} is not one)")
    return {**event, "identitySlug": event["slug"], "metadata": event["metadataText"],
            "createdAt": from_iso(event["createdAt"])}


def read_exports(paths: list[str]) -> dict[str, list[tuple[str, list[dict]]]]:
    """Each export's events, by workspace: for each, (file, its events in chain order, the
    unchained last), in the order the files were given."""
    found: dict[str, dict[str, list[dict]]] = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as export:
                for number, line in enumerate(export, 1):
                    if line.strip():
                        event = exported_event(line, f"{quote(path)} line {number}")
                        found.setdefault(event["workspacePublicId"], {}).setdefault(path, []).append(event)
        except OSError as exc:
            raise AdminError(EXIT_USAGE, f"cannot read audit export {quote(path)}: {exc.strerror}") from None
    if not found:
        raise AdminError(EXIT_USAGE, f"no audit events in {', '.join(map(quote, paths))}: nothing to verify")

    def order(event: dict):
        return (event["sequence"] is None, event["sequence"] or 0)

    return {workspace: [(path, sorted(events, key=order)) for path, events in files.items()]
            for workspace, files in found.items()}


def chained(events: list[dict]) -> dict[int, dict]:
    return {event["sequence"]: event for event in events if event["sequence"] is not None}


def between_exports(earlier: tuple[str, list[dict]], later: tuple[str, list[dict]]) -> list[dict]:
    """Where a later export of a workspace disagrees with an earlier one (breaks of kind
    diverged, the first of each way): an event they both hold that differs in any field;
    one the earlier holds that the later, covering its place, does not (deleted); a later
    export that ends before the earlier one did (cut off); or one that does not follow on
    from where the earlier ended (a gap between them, or a link to another event)."""
    before_path, after_path = earlier[0], later[0]
    old, new = chained(earlier[1]), chained(later[1])
    if not old or not new:
        return []
    found = []

    def diverged(sequence: int, event: dict | None, message: str) -> None:
        found.append({"kind": "diverged", "sequence": sequence, "eventPublicId": event and event["publicId"],
                      "message": message})

    first, last = min(new), max(new)
    changed = sorted(n for n in old if n in new and any(old[n][f] != new[n][f] for f in EXPORT_FIELDS))
    if changed:
        diverged(changed[0], new[changed[0]], f"event {changed[0]} differs between {before_path} and {after_path}: "
                                              f"the log was rewritten at or before it after {before_path} was "
                                              "exported")
    gone = sorted(n for n in old if first <= n <= last and n not in new)
    if gone:
        diverged(gone[0], old[gone[0]], f"event {gone[0]}, in {before_path}, is not in {after_path}: deleted since")
    if first <= max(old) and last < max(old):
        diverged(last + 1, old[max(old)], f"{after_path} ends at event {last}, before event {max(old)} that "
                                          f"{before_path} holds: events were removed from the end")
    if first > max(old) + 1:
        diverged(max(old) + 1, None, f"events {max(old) + 1} to {first - 1} are in neither {before_path} nor "
                                     f"{after_path}: nothing shows whether they were kept")
    elif first == max(old) + 1 and new[first]["previousHash"] != old[max(old)]["hash"]:
        diverged(first, new[first], f"event {first}, first of {after_path}, does not link to event {max(old)} of "
                                    f"{before_path}: the log was rewritten at or before it")
    return found


def verify_export(workspace: str, files: list[tuple[str, list[dict]]], pins: tuple[Head, ...]) -> dict:
    """One workspace's exports: each walked as check_chain walks the database's chain (from
    its first event, as an export may start part-way; every pin it covers checked), and
    each held to every export given before it."""
    breaks, events, covered = [], set(), set()
    for index, (path, exported) in enumerate(files):
        sequences = chained(exported)
        report = check_chain(exported, tuple(p for p in pins if p.sequence in sequences), resume=True)
        breaks += [dict(b, message=f"{path}: {b['message']}") for b in report["breaks"]]
        events |= set(sequences)
        covered |= {p for p in pins if p.sequence in sequences}
        for earlier in files[:index]:
            breaks += between_exports(earlier, (path, exported))
    breaks += [unreached(pin, max(events, default=0) + 1) for pin in pins if pin not in covered]
    return {"workspacePublicId": workspace, "slug": None, "events": len(events), "head": report["head"],
            "first": min(events, default=None), "intact": not breaks, "break": breaks[0] if breaks else None,
            "breaks": breaks, "pins": [str(pin) for pin in pins]}


def verify_exports(args: argparse.Namespace) -> dict:
    """audit verify --file: each export's chains checked as the database's are (links,
    hashes, order, pins), and each export held to those given before it. Runs before any
    connection; its result is the verdict."""
    exports = read_exports(args.file)
    wanted = Ref.of(args).workspace
    if wanted:
        exports = {w: files for w, files in exports.items() if w == wanted}
        if not exports:
            raise AdminError(EXIT_USAGE, f"no event of workspace {wanted} in the exports given")
    spans = {w: {e["sequence"] for _, events in files for e in events if e["sequence"] is not None}
             for w, files in exports.items()}
    pins, notes = pins_for(args, sorted(exports), spans)
    reports = [verify_export(workspace, files, pins.get(workspace, ())) for workspace, files in sorted(exports.items())]
    return {"verdict": chain_result(reports, files=list(args.file), warnings=notes,
                                    checked={"workspaces": len(reports), "events": sum(r["events"] for r in reports)})}


def audit_inputs(args: argparse.Namespace) -> dict:
    """What audit reads before any connection: with --file, the exports, and the verdict."""
    return verify_exports(args) if args.file else {}


def read_token(args: argparse.Namespace) -> str:
    """One token from --token-file or standard input; never from the command line."""
    if args.token_file and args.token_file != "-":
        try:
            with open(args.token_file, encoding="utf-8", errors="replace") as source:
                text = source.read(TOKEN_INPUT_MAX + 1)
        except OSError as exc:
            raise AdminError(EXIT_USAGE, f"cannot read token file {quote(args.token_file)}: {exc.strerror}") from None
    elif sys.stdin is None:
        text = ""
    elif sys.stdin.isatty():
        import getpass

        try:
            text = getpass.getpass("token (not echoed): ")
        except EOFError:  # Ctrl-D at the prompt
            text = ""
    else:
        text = sys.stdin.read(TOKEN_INPUT_MAX + 1)
    token = text.strip()
    if not token:
        raise AdminError(EXIT_USAGE, "no token given: pipe it to standard input, or use --token-file PATH")
    return token


def verify_result(reason: str | None, row: dict | None = None) -> dict:
    result = {"ok": True, "command": "verify", "valid": reason is None, "reason": reason,
              "identity": None, "token": None}
    if row is not None:
        result["identity"] = identity_view(json_times(row["identity"]), row["workspacePublicId"])
        result["token"] = {"publicId": row["publicId"], "scopes": list(row["scopes"]),
                           "expiresAt": iso(row["expiresAt"])}
    return result


class Presented(collections.namedtuple("Presented", "text public_id")):
    """The token verify was given, and the public id its form names."""

    __slots__ = ()


def read_presented(args: argparse.Namespace) -> dict:
    """verify's input, read before any connection: the token, or — when its form alone
    refuses it, as a server would with no database or argon2 work — the verdict."""
    text = read_token(args)
    public_id, defect = parse_token(text)
    return {"verdict": verify_result(defect)} if defect else {"token": Presented(text, public_id)}


def cmd_verify(db: Database, args: argparse.Namespace, token: Presented) -> dict:
    """Say whether the server should accept a token now, and if not, why. Writes nothing
    but the access.denied event of a refused actor."""
    from argon2.exceptions import InvalidHashError, VerifyMismatchError

    ref = Ref.of(args)
    try:
        with db.transaction(read_only=True) as session:
            access = access_of(db, session, args, ref, detail=VERIFY_DETAIL,
                               params={"token_public_id": token.public_id}, allow_deleted=True)
    except AdminError as refused:
        if ref.workspace or isinstance(refused, ClaimRefused) or refused.exit_code not in (EXIT_NOT_FOUND,
                                                                                            EXIT_FORBIDDEN):
            raise  # the operator named the workspace, or claimed to be somebody else: say what is wrong
        if isinstance(refused, AccessDenied):
            # A token of a workspace the actor may not manage gets the answer an unknown
            # id gets, so verify tells nobody whether a token exists; the audit event
            # in the token's workspace records the probe.
            refused.token_public_id = token.public_id
            record_denial(db, args, refused)
        return verify_result("unknown_token")
    row = access["detail"]
    if row is None:
        return verify_result("unknown_token")
    row = dict(json_times(row), workspacePublicId=access["workspace_public_id"])
    try:
        token_hasher().verify(row["tokenHash"], token.text)
    except VerifyMismatchError:
        return verify_result("hash_mismatch", row)
    except InvalidHashError:
        raise AdminError(EXIT_INTERNAL, f"the stored hash of token {row['publicId']} is not an argon2 hash") from None
    status = row["identity"]["status"]
    failed = {"token_revoked": row["revokedAt"] is not None, "token_expired": row["expired"],
              "identity_paused": status == "paused", "identity_revoked": status == "revoked",
              "workspace_deleted": access["workspace_deleted"]}
    return verify_result(next((reason for reason in VERIFY_REASONS if failed.get(reason)), None), row)


class Checks(list):
    """doctor's checks as they are made: each a name, whether it passed, what was found,
    and, for a failure or a warning (which passes), the fix."""

    def add(self, name: str, ok: bool, detail: str, fix: str | None = None, *, warning: bool = False) -> bool:
        # A detail may quote what the operator gave, like an error does: scrubbed the same way.
        self.append({"name": name, "ok": ok, "warning": ok and warning, "detail": scrub_tokens(detail),
                     "fix": fix if not ok or warning else None})
        return ok


def doctor_connection(conn, session: Session, checks: Checks, found: dict) -> None:
    version = conn.execute("SELECT current_setting('server_version')").fetchone()[0]
    checks.add("connection", True, f"PostgreSQL {version}, {describe_target(target_of(conn))}")


def doctor_limits(conn, session: Session, checks: Checks, found: dict) -> None:
    limits = session_limits(found["lock_timeout"])
    shown = dict(conn.execute(LIMITS_SQL, {"names": list(limits)}).fetchall())
    wrong = [f"{name} is {shown.get(name)}" for name, value in limits.items()
             if shown.get(name) != value.removesuffix("ms")]
    checks.add("session limits", not wrong,
               "; ".join(wrong) if wrong else "lock, statement and idle timeouts and UTC hold in each transaction",
               "something between the tool and the server drops SET LOCAL: connect to PostgreSQL directly")


def doctor_kan_tables(conn, session: Session, checks: Checks, found: dict) -> None:
    from psycopg.rows import dict_row

    columns = found["columns"] = {}
    if session.schema:
        for row in conn.cursor(row_factory=dict_row).execute(DOCTOR_COLUMNS_SQL, {
                "schema": session.schema, "tables": [*KAN_TABLES, *EXPECTED_COLUMNS]}):
            columns.setdefault(row["table"], {})[row["column"]] = row["type"]
    missing = [t for t in KAN_TABLES if t not in columns]
    found["kan"] = checks.add(
        "Kan tables", not missing,
        f"missing: {', '.join(missing)} (looked in schema {session.schema or 'none'}; the search_path is "
        f"{', '.join(session.path)})" if missing else f"{len(KAN_TABLES)} present, in schema {session.schema}",
        "connect to Kan's database (is this the right one?), or give the role the search_path Kan uses "
        "(ALTER ROLE ... SET search_path, or options=-c search_path=... in a direct URL), or --db-schema")


def doctor_names(conn, session: Session, checks: Checks, found: dict) -> None:
    """Nothing stands in for Kan's or the agent tables where an unqualified name (Kan's
    own queries) would look first; and whether anything could be planted."""
    from psycopg.rows import dict_row

    params = {"schema": session.schema, "path": session.path, "tables": [*KAN_TABLES, *AGENT_TABLES]}
    cursor = conn.cursor(row_factory=dict_row)
    planted = [f"{'a temporary ' + row['table'] + ' (' + row['schema'] + ')' if row['temporary'] else row['schema'] + '.' + row['table']}"
               for row in cursor.execute(LOOKALIKES_SQL, params)]
    rights = cursor.execute(CREATE_RIGHTS_SQL, params).fetchone()
    could = ([f"role {target_of(conn)['role']} may create temporary tables"] if rights["temporary_from"] else []) + \
        [f"PUBLIC may create in schema {schema}" for schema in rights["public_create"]]
    fixes = ([f"REVOKE TEMPORARY ON DATABASE {quote_identifier(rights['database'])} FROM "
              f"{', '.join(rights['temporary_from'])} (a pooled connection keeps a session's temporary tables "
              "for its next client)"] if rights["temporary_from"] else []) + \
        [f"REVOKE CREATE ON SCHEMA {quote_identifier(schema)} FROM PUBLIC" for schema in rights["public_create"]]
    copies = [schema for schema in session.kan_schemas if schema != session.schema]
    if copies:
        planted.append(f"copies of Kan's tables in schema {', '.join(copies)}")
    if planted:
        checks.add("names", False, f"found beside schema {session.schema}'s own tables: {', '.join(planted)}; a "
                                   "search_path (Kan's, or a role's own) could read those",
                   "drop them, and find who made them (a temporary table lives as long as its session: end it, "
                   "or DISCARD TEMP on a pooler's server connections); " + "; ".join(fixes or ["then run doctor again"]))
    else:
        checks.add("names", True, f"Kan's and the agent tables resolve to schema {session.schema}, nothing shadows "
                                  "them" + (f"; but {' and '.join(could)}" if could else ""),
                   "; ".join(fixes), warning=bool(could))


def doctor_agent_tables(conn, session: Session, checks: Checks, found: dict) -> None:
    from psycopg.rows import dict_row

    columns, drift = found["columns"], []
    for table, wanted in EXPECTED_COLUMNS.items():
        if table not in columns:
            drift.append(f"{table} is missing")
            continue
        for column, expected in wanted.items():
            actual = columns[table].get(column)
            if actual != expected:
                drift.append(f'{table}."{column}" is {actual or "missing"}, expected {expected}')
    elsewhere = {}
    for row in conn.cursor(row_factory=dict_row).execute(ELSEWHERE_SQL, {
            "schema": session.schema, "path": session.path, "tables": list(EXPECTED_COLUMNS)}):
        elsewhere.setdefault(row["table"], row["schema"])
    apart = [f"{table} is in schema {elsewhere[table]}" for table in sorted(elsewhere) if table not in columns]
    if apart:
        drift = [f"Kan's workspace is in schema {session.schema}, but " + ", ".join(apart)]
    found["agent"] = checks.add(
        "agent tables", not drift,
        "; ".join(drift) if drift else f"{len(EXPECTED_COLUMNS)} present, in schema {session.schema}, every column "
                                       "as expected",
        f"apply `agent-identity schema --db-schema {session.schema or 'SCHEMA'}` as the owner of Kan's tables "
        "(a migration if a column differs)")


def doctor_token_hashes(conn, session: Session, checks: Checks, found: dict) -> None:
    old = conn.execute(compose(OLD_HASHES_SQL, session.schema), {"prefix": ARGON2_PHC_PREFIX}).fetchone()[0]
    checks.add("token hashes", True,
               f"{old} live token{'' if old == 1 else 's'} still carr{'ies' if old == 1 else 'y'} older, slower "
               "argon2 parameters: they verify; rotate them to re-hash (agent-identity rotate)"
               if old else f"every live token is hashed with argon2id m={ARGON2_MEMORY_KIB} KiB, "
                           f"t={ARGON2_TIME_COST}, p={ARGON2_PARALLELISM}")


def trigger_type(trigger: SchemaTrigger) -> int:
    """pg_trigger.tgtype of a trigger as schema makes it."""
    bits = {"INSERT": 4, "DELETE": 8, "UPDATE": 16, "TRUNCATE": 32}
    level = 0 if trigger.events == "TRUNCATE" else 1
    return level | (2 if trigger.timing == "BEFORE" else 0) | sum(bits[e] for e in trigger.events.split(" OR "))


def safeguard_faults(conn, schema: str) -> tuple[list[str], dict]:
    """Each function, trigger, rule and policy of the agent tables that is not as schema
    makes it (missing, disabled, different, extra), and what was counted."""
    from psycopg.rows import dict_row

    cursor = conn.cursor(row_factory=dict_row)
    params = {"schema": schema, "tables": list(AGENT_TABLES), "names": [f.name for f in SCHEMA_FUNCTIONS]}
    faults = []
    functions: dict[str, list[dict]] = {}
    for row in cursor.execute(FUNCTIONS_SQL, params):
        functions.setdefault(row["name"], []).append(row)
    for wanted in SCHEMA_FUNCTIONS:
        rows = functions.get(wanted.name, [])
        if not rows:
            faults.append(f"function {wanted.name} is missing")
            continue
        if len(rows) > 1:
            faults.append(f"function {wanted.name} has {len(rows) - 1} extra overload(s)")
        row = rows[0]
        expected = {
            "body": wanted.body.format(schema=quote_identifier(schema)), "language": wanted.language,
            "volatility": wanted.volatility[0].lower(), "definer": wanted.definer,
            "config": [] if wanted.inlined else [f"search_path={SAFE_SEARCH_PATH}"], "public_execute": not wanted.private,
            "strict": False, "returns_set": wanted.returns.startswith(("TABLE", "SETOF")), "leakproof": False,
            "arguments": len(wanted.signature.split(", ")) if wanted.signature else 0,
        }
        different = [key for key, value in expected.items() if row[key] != value]
        if different:
            faults.append(f"function {wanted.name} differs ({', '.join(different)})")
    triggers = {(row["table"], row["name"]): row for row in cursor.execute(TRIGGERS_SQL, params)}
    for wanted in SCHEMA_TRIGGERS:
        row = triggers.pop((wanted.table, wanted.name), None)
        if row is None:
            faults.append(f"trigger {wanted.name} is missing")
            continue
        replica = row["replication_role"] == "replica"
        if row["enabled"] == "D" or (row["enabled"] == "O" and replica) or (row["enabled"] == "R" and not replica):
            why = ("this role's session_replication_role is replica" if replica and row["enabled"] == "O"
                   else "it fires only for replicas" if row["enabled"] == "R" else "disabled")
            faults.append(f"trigger {wanted.name} does not fire here ({why})")
        expected = {"function_schema": schema, "function": wanted.function, "type": trigger_type(wanted),
                    "deferrable": wanted.deferred, "deferred": wanted.deferred, "conditional": False,
                    "arguments": 0, "columns": sorted(wanted.columns)}
        different = [key for key, value in expected.items() if row[key] != value]
        if different:
            faults.append(f"trigger {wanted.name} differs ({', '.join(different)})")
    faults += [f"trigger {name} on {table} is extra" for table, name in sorted(triggers)]
    faults += [f"rule {row['name']} on {row['table']} is extra" for row in cursor.execute(RULES_SQL, params)]
    policies = cursor.execute(POLICIES_SQL, params).fetchall()
    faults += [f"policy {row['name']} on {row['table']} is extra" for row in policies
               if row["permissive"] != "PERMISSIVE" or row["everyone"]
               or (row["table"], row["cmd"], row["qual"], row["with_check"]) not in EXPECTED_POLICIES]
    constraints = {(row["table"], row["name"]) for row in cursor.execute(CONSTRAINTS_SQL, params)}
    wanted_constraints = {(table, name) for table, names in SCHEMA_CONSTRAINTS.items() for name in names}
    faults += [f"constraint {name} on {table} is missing" for table, name in sorted(wanted_constraints - constraints)]
    faults += [f"constraint {name} on {table} is extra" for table, name in sorted(constraints - wanted_constraints)]
    for row in cursor.execute(SECURED_SQL, params):
        if not row["enabled"] or row["forced"]:
            faults.append(f"row level security on {row['table']} is {'forced' if row['forced'] else 'off'}")
    return faults, {"functions": len(SCHEMA_FUNCTIONS), "triggers": len(SCHEMA_TRIGGERS), "policies": len(policies)}


def doctor_safeguards(conn, session: Session, checks: Checks, found: dict) -> None:
    """The functions, triggers, rules and policies of the agent tables are exactly those
    schema makes (and its role SQL's policies): the owner of the tables could switch or
    rewrite one, and this is where that shows."""
    faults, counted = safeguard_faults(conn, session.schema)
    found["safeguards"] = checks.add(
        "safeguards", not faults,
        "; ".join(faults) if faults else
        f"{counted['functions']} functions and {counted['triggers']} triggers as schema {__version__} makes them, "
        f"{counted['policies']} policies as docs/security.md's, no rules: revocation is final, every change is "
        "audited, the audit log is append-only and chained",
        f"re-apply `agent-identity schema --db-schema {session.schema}` as the tables' owner (it makes every "
        "function and trigger again), drop what it does not make (DROP TRIGGER/RULE/POLICY ...), ALTER ROLE ... "
        "RESET session_replication_role; then find out who changed them: only the owner (or a superuser) can "
        "(docs/security.md)")


def doctor_times(conn, session: Session, checks: Checks, found: dict) -> None:
    bad = [f"{count} {what}" for what, count in conn.execute(compose(BAD_TIMES_SQL, session.schema)) if count]
    checks.add("times", not bad,
               f"not a time the tool stands behind: {'; '.join(bad)}" if bad else
               "every time is finite and within years 1 to 9999, and every token expires after it was made",
               "written before the database refused them (schema 0.4.0): as the owner, UPDATE agent_token SET "
               '"lastUsedAt" = NULL where it is one; revoke a token whose expiry is one (agent-identity revoke '
               "--token ID); treat an event's as tampering (audit verify)")


def chain_health(conn, session: Session, login: dict | None = None) -> list[dict]:
    """Every workspace's audit chain, whoever manages it, verified and held to its tables:
    intact, broken, or not yet chained (events from before the chain, which applying
    schema chains). A proven login's: those of the workspaces it may manage (of any
    other it sees only the refusals it wrote)."""
    from psycopg.rows import dict_row

    health = []
    workspaces = conn.cursor(row_factory=dict_row).execute(compose(AUDITED_WORKSPACES_SQL, session.schema)).fetchall()
    if login and login["mapped"]:
        managed = {row[0] for row in conn.execute(compose(LOGIN_WORKSPACES_SQL, session.schema))}
        workspaces = [workspace for workspace in workspaces if workspace["id"] in managed]
    for workspace in workspaces:
        report = verify_workspace(conn, session.schema, workspace["id"], now=session.now + CLOCK_SLACK)
        waiting = not report["events"] and all(b["kind"] == "unchained" for b in report["breaks"])
        state = "intact" if report["intact"] else "not_chained" if waiting else "broken"
        health.append({"workspacePublicId": workspace["publicId"], "slug": workspace["slug"], "state": state,
                       **report})
    return health


def doctor_chains(conn, session: Session, checks: Checks, found: dict) -> None:
    chains = found["chains"]
    chains.extend(chain_health(conn, session, found["login"]))

    def name(chain: dict) -> str:
        return f"{chain['slug'] or chain['workspacePublicId']} ({chain['workspacePublicId']})"

    intact = [c for c in chains if c["state"] == "intact"]
    broken = [c for c in chains if c["state"] == "broken"]
    waiting = [c for c in chains if c["state"] == "not_chained"]
    said = [f"{len(intact)} of {len(chains)} workspaces intact and as their tables say "
            f"({sum(c['events'] for c in intact)} events)"]
    said += [f"broken: {name(c)} at {c['break']['sequence'] or 'an unchained event'} ({c['break']['kind']}"
             + (f", and {len(c['breaks']) - 1} more" if len(c["breaks"]) > 1 else "") + ")" for c in broken]
    if waiting:
        said.append(f"not yet chained: {', '.join(map(name, waiting))}")
    fixes = []
    if waiting:
        fixes.append("apply `agent-identity schema` as the owner of Kan's tables: it chains the older events")
    if broken:
        fixes.append("run `agent-identity audit verify --workspace W` for each broken one and treat its log as "
                     "tampered with from that event on (docs/runbook.md)")
    checks.add("audit chains", not (broken or waiting), "; ".join(said), "; ".join(fixes))


def doctor_access(conn, session: Session, checks: Checks, found: dict) -> None:
    from psycopg.rows import dict_row

    present = [t for t in (*KAN_TABLES, *EXPECTED_COLUMNS) if t in found["columns"] and t not in OWNER_ONLY_TABLES]
    blind = [row["table"] for row in conn.cursor(row_factory=dict_row).execute(
        READABLE_SQL, {"tables": present, "schema": session.schema}) if not (row["can_select"] and row["past_rls"])]
    found["blind"] = blind
    if present:
        checks.add("row level security", not blind,
                   f"this role cannot read rows of: {', '.join(blind)}" if blind
                   else f"this role reads all {len(present)} tables",
                   "connect as the tables' owner, or create the role of docs/security.md")
    if found["agent"]:
        [lacking] = conn.execute(WRITABLE_SQL, {"schema": session.schema}).fetchone()
        checks.add("privileges", not lacking,
                   f"this role lacks {', '.join(lacking)}" if lacking
                   else "this role may write what the tool writes, and take a workspace's turn",
                   "give it the grants of docs/security.md's role SQL (as the tables' owner)")


def doctor_login(conn, session: Session, checks: Checks, found: dict) -> None:
    """Whether actors are proven (this session's login mapped to a Kan user) or claims."""
    login = found["login"] = session.login
    if login is None:
        return  # the safeguards check names agent_session_login missing
    name = quote(login["login"])
    unheld = [row[0] for row in conn.execute(UNHELD_SQL, {"schema": session.schema, "tables": list(AGENT_TABLES)})]
    if login["mapped"] and unheld:
        checks.add("login", False, f"login {name} is mapped to {quote(login['email'])}, but row level security does "
                                   f"not hold it to that user's workspaces: {', '.join(unheld)}",
                   "a maintainer's login belongs to the maintainers' group alone: no superuser, BYPASSRLS, owner or "
                   "shared role's membership (docs/security.md, \"Proven actors\")")
    elif login["mapped"]:
        checks.add("login", True, f"proven: login {name} is {quote(login['email'])}, and the database admits it only "
                                  "to the workspaces that user may manage now")
    elif login["inGroup"]:
        checks.add("login", False, f"login {name} is in the maintainers' group but mapped to no Kan user (never "
                                   "mapped, or Kan deleted its user): every command refuses it",
                   "the tables' owner maps it with docs/security.md's maintainer-login SQL")
    else:
        checks.add("login", True, f"a claim: login {name} is no maintainer's own, so --admin-user-email names the "
                                  "actor, and anyone holding these credentials can name anyone",
                   'give each maintainer a login of their own: docs/security.md, "Proven actors"', warning=True)


def doctor_actor(conn, session: Session, checks: Checks, found: dict) -> None:
    args = found["args"]
    ref = Ref.of(args)
    if not ref.workspace:
        return
    try:
        email = actor_of(found["login"] or UNKNOWN_LOGIN, claimed_actor(args))
        if found["kan"] and not found["blind"]:
            check_access(conn, session, ref, email)
            checks.add("actor", True, f"{email} manages workspace {ref.workspace}")
    except AdminError as exc:
        checks.add("actor", False, exc.message,
                   "give --admin-user-email or AGENT_IDENTITY_ADMIN_EMAIL" if exc.exit_code == EXIT_USAGE
                   else "an admin of the workspace can grant workspace:manage in Kan")


# doctor's checks in the order they run, each with what it needs to have passed first.
DOCTOR_CHECKS = (
    (doctor_connection, ()),
    (doctor_limits, ()),
    (doctor_kan_tables, ()),
    (doctor_names, ("kan",)),
    (doctor_agent_tables, ("kan",)),
    (doctor_token_hashes, ("agent",)),
    (doctor_safeguards, ("agent",)),
    (doctor_login, ("agent",)),
    (doctor_times, ("agent", "safeguards")),
    (doctor_chains, ("agent",)),
    (doctor_access, ("kan",)),
    (doctor_actor, ("kan",)),
)


def cmd_doctor(args: argparse.Namespace) -> dict:
    """Check what the tool needs, one line each, with how to fix what fails."""
    import psycopg

    checks = Checks()
    found = {"args": args, "lock_timeout": args.lock_timeout, "chains": [], "columns": {}, "kan": False,
             "agent": False, "safeguards": False, "blind": [], "login": None}

    def result() -> dict:
        login = found["login"] or {}
        return {"ok": True, "command": "doctor", "healthy": all(c["ok"] for c in checks), "checks": checks,
                "actorProven": bool(login.get("mapped")), "login": login.get("login"),
                "user": {"id": str(login["userId"]), "email": login["email"]} if login.get("mapped") else None,
                "chains": found["chains"]}

    try:
        conn = connect(database_url(args))
    except AdminError as exc:
        checks.add("connection", False, exc.message,
                   "set --database-url, DATABASE_URL or POSTGRES_URL to the Kan database")
        return result()
    target = target_of(conn)
    try:
        with conn, transaction(conn, args.lock_timeout, read_only=True, schema=pinned_schema(args),
                               require_schema=False) as session:
            for check, needs in DOCTOR_CHECKS:
                if all(found[need] for need in needs):
                    check(conn, session, checks, found)
    except psycopg.Error as exc:
        checks.add("database", False, database_error(exc, args.lock_timeout, target).message, "see the message")
    return result()


# --- Output -----------------------------------------------------------------


TABLE_CELL_MIN = 8  # a cut cell keeps at least this much, the … included


def format_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Columns aligned on the widest cell; empty cells show as '-'; a line each."""
    cells = [headers] + [[cell if cell not in (None, "") else "-" for cell in row] for row in rows]
    widths = column_widths(cells)
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]


def column_widths(cells: list[list]) -> list[int]:
    return [max(len(str(row[i])) for row in cells) for i in range(len(cells[0]))]


def fit_table(headers: list[str], rows, width: int | None, *, drop: tuple[str, ...] = (),
              shrink: tuple[str, ...] = ()) -> list[str]:
    """A table no wider than width: its full rows if they fit; else with times in their
    short, relative form; else leaving out the columns in drop, least important first;
    else cutting the long cells of the columns in shrink with '…'. rows(short) gives the
    rows; width None (--wide) prints the full rows uncut.
    """
    def measure(headers, rows) -> int:
        cells = [headers] + [[cell or "-" for cell in row] for row in rows]
        return sum(column_widths(cells)) + 2 * (len(headers) - 1)

    def visible_rows(short: bool) -> list[list]:
        return [[cell and visible(str(cell)) for cell in row] for row in rows(short)]

    full = visible_rows(False)
    if width is None or measure(headers, full) <= width or not full:
        return format_table(headers, full)
    headers, table = list(headers), visible_rows(True)
    for name in drop:
        if measure(headers, table) <= width:
            break
        column = headers.index(name)
        del headers[column]
        for row in table:
            del row[column]
    for name in shrink:
        excess = measure(headers, table) - width
        if excess <= 0:
            break
        column = headers.index(name)
        current = max(len(row[column] or "-") for row in table)
        keep = max(TABLE_CELL_MIN, len(headers[column]), current - excess)
        for row in table:
            if row[column] and len(row[column]) > keep:
                row[column] = row[column][:keep - 1] + "…"
    return format_table(headers, table)


def render_identity_line(identity: dict) -> str:
    return (
        f"{identity['slug']} ({identity['publicId'] or 'new'}) {quote(identity['displayName'])} "
        f"in workspace {identity['workspacePublicId']}: {identity['status']}"
    )


# What a mutation did, and what a dry run would do, by audit action.
MUTATION_VERBS = {
    "identity.created": ("created", "would create"),
    "identity.token_rotated": ("rotated the token of", "would rotate the token of"),
    "identity.paused": ("paused", "would pause"),
    "identity.resumed": ("resumed", "would resume"),
    "identity.revoked": ("revoked", "would revoke"),
    "identity.token_revoked": ("revoked a token of", "would revoke a token of"),
    "issue": ("issued", "would issue"),
    "revoke token": ("revoked", "would revoke"),
    "record": ("recorded", "would record"),
}


def render_time(moment: str | None, now: datetime | None = None, short: bool = False) -> str | None:
    """"2026-11-29T02:12:41Z (3 days ago)": UTC, and how long ago or ahead when now is known;
    short, only "3 days ago" (for a table that must fit the terminal)."""
    if moment is None or now is None:
        return moment
    if short:
        return relative(from_iso(moment), now)
    return f"{moment} ({relative(from_iso(moment), now)})"


def render_expiry(expires_at: str | None, now: datetime | None = None, short: bool = False) -> str:
    return "never" if expires_at is None else render_time(expires_at, now, short)


def render_mutation(result: dict) -> tuple[list[str], list[str]]:
    """Lines for stdout and for stderr after create, rotate, pause, resume or revoke."""
    if not result["changed"]:
        return [result["message"]], [f"target: {describe_target(result['target'])}"]
    dry_run = result["dryRun"]

    def verb(name: str) -> str:
        return MUTATION_VERBS[name][dry_run]

    action = result["auditEvent"]["action"]
    if "identities" in result:  # --all
        slugs = [identity["slug"] for identity in result["identities"]]
        lines = [f"{verb(action)} {len(slugs)} agent identit{'y' if len(slugs) == 1 else 'ies'} in workspace "
                 f"{result['workspacePublicId']}: {', '.join(slugs)}"]
    else:
        lines = [f"{verb(action)} agent identity {render_identity_line(result['identity'])}"]
    token = result.get("token")
    if token:
        kept = " (the rotated token's)" if token.get("lifetimeKept") else ""
        lines.append(
            f"{verb('issue')} token {token['publicId'] or '(new)'} {quote(token['name'])} "
            f"with scopes {','.join(token['scopes'])}, lifetime {token['expiresIn']}{kept}, "
            f"expiring {render_expiry(token['expiresAt'])}"
        )
    revoked = result.get("revokedTokenPublicIds") or []
    if revoked:
        lines.append(f"{verb('revoke token')} token{'s' if len(revoked) > 1 else ''} {', '.join(revoked)}")
    for graced in result.get("gracedTokens") or []:
        lines.append(f"{'would let' if dry_run else 'let'} token {graced['publicId']} work until {graced['expiresAt']}")
    if "identities" in result:
        lines.append(f"{verb('record')} {len(result['identities'])} audit events {action}, batch {result['batchId']}")
    else:
        lines.append(f"{verb('record')} audit event {action}")
    notes = [f"target: {describe_target(result['target'])}"]
    if token and token.get("lifetimeKept") and token["expiresIn"] == "never":
        notes.append("the new token never expires, as the rotated one was issued with --expires-in never; "
                     "give --expires-in to change that")
    if dry_run:
        notes.append("dry run: nothing was written")
    elif token and token.get("tokenFile") == "-":
        lines.append("token: on standard output, alone")
        notes.append("store this token now: it is shown once and only its hash is kept")
    elif token and "tokenFile" in token:
        lines.append(f"token: written to {quote(token['tokenFile'])} (mode 0600)")
    elif token:
        lines.append(f"token: {token['secret']}")
        notes.append("store this token now: it is shown once and only its hash is kept")
    return lines, notes


def render_inspect(result: dict, width: int | None) -> list[str]:
    identity = result["identity"]
    now = from_iso(result["now"])
    lines = [
        f"identity   {identity['slug']} ({identity['publicId']})",
        f"name       {identity['displayName']}",
        f"workspace  {identity['workspacePublicId']}",
        f"status     {identity['status']}" + " (down: no live token)" * identity["down"],
        f"created    {render_time(identity['createdAt'], now)}",
    ]
    for label, key in (("updated", "updatedAt"), ("paused", "pausedAt"), ("revoked", "revokedAt")):
        if identity[key]:
            lines.append(f"{label:<10} {render_time(identity[key], now)}")
    lines = [visible(line) for line in lines]
    if width is not None:
        lines = [line if len(line) <= width else line[:width - 1] + "…" for line in lines]
    lines += ["", "tokens"]
    lines.extend(fit_table(
        ["PUBLIC ID", "NAME", "SCOPES", "LIVE", "CREATED", "EXPIRES", "LAST USED", "REVOKED", "ROTATED FROM"],
        lambda short: [
            [t["publicId"], t["name"], ",".join(t["scopes"]), "yes" if t["live"] else "no",
             render_time(t["createdAt"], now, short), render_expiry(t["expiresAt"], now, short),
             render_time(t["lastUsedAt"], now, short), render_time(t["revokedAt"], now, short),
             t["rotatedFromPublicId"]]
            for t in identity["tokens"]
        ],
        width, drop=("ROTATED FROM", "CREATED", "REVOKED", "LAST USED"), shrink=("SCOPES", "NAME"),
    ))
    lines += ["", "events (newest first)"]
    lines.extend(fit_table(
        ["WHEN", "ACTION", "ACTOR", "TOKEN", "REASON"],
        lambda short: [[render_time(e["createdAt"], now, short), e["action"], e["actorEmail"], e["tokenPublicId"],
                        e["reason"]] for e in identity["events"]],
        width, drop=("TOKEN",), shrink=("REASON", "ACTOR"),
    ))
    return lines


def render_list(result: dict, width: int | None) -> list[str]:
    if not result["identities"]:
        return [f"no agent identities in workspace {result['workspacePublicId']}"]
    now = from_iso(result["now"])
    return fit_table(
        ["SLUG", "PUBLIC ID", "STATUS", "LIVE TOKENS", "NEXT EXPIRY", "LAST USED", "CREATED", "DISPLAY NAME"],
        lambda short: [
            [i["slug"], i["publicId"], i["status"] + " (down)" * i["down"], str(i["liveTokens"]),
             render_expiry(i["nextExpiresAt"], now, short) if i["liveTokens"] else None,
             render_time(i["lastUsedAt"], now, short), render_time(i["createdAt"], now, short), i["displayName"]]
            for i in result["identities"]
        ],
        width, drop=("CREATED", "LAST USED", "PUBLIC ID"), shrink=("DISPLAY NAME", "SLUG"),
    )


def render_workspaces(result: dict, width: int | None) -> list[str]:
    if not result["workspaces"]:
        return [f"no workspace that {quote(result['actorEmail'])} may manage"]
    return fit_table(
        ["PUBLIC ID", "SLUG", "ACTIVE", "PAUSED", "REVOKED", "LIVE TOKENS", "NEXT EXPIRY", "NAME"],
        lambda short: [
            [w["publicId"], w["slug"], str(w["identities"]["active"]), str(w["identities"]["paused"]),
             str(w["identities"]["revoked"]), str(w["liveTokens"]),
             render_expiry(w["nextExpiresAt"]) if w["liveTokens"] else None, w["name"]]
            for w in result["workspaces"]
        ],
        width, drop=("REVOKED", "PAUSED"), shrink=("NAME", "SLUG"),
    )


def render_expiring(result: dict, width: int | None) -> list[str]:
    now = from_iso(result["now"])
    lines = [f"no live token expires within {result['within']}"] if not result["tokens"] else fit_table(
        ["EXPIRES", "WORKSPACE", "IDENTITY", "TOKEN", "NAME"],
        lambda short: [[render_time(t["expiresAt"], now, short), t["workspaceSlug"] or t["workspacePublicId"],
                        t["slug"], t["publicId"], t["name"] + (" (superseded)" if t["superseded"] else "")]
                       for t in result["tokens"]],
        width, drop=(), shrink=("NAME", "IDENTITY", "WORKSPACE"),
    )
    for down in result["down"]:
        why = (f"its last expired {render_time(down['lastExpiredAt'], now, True)}" if down["lastExpiredAt"]
               else "every token was revoked")
        lines.append(f"down: {down['workspaceSlug'] or down['workspacePublicId']} {down['slug']} is active with no "
                     f"live token ({why}): its agent cannot reach Kan; rotate it")
    return lines


def render_review(result: dict, width: int | None) -> list[str]:
    """The table of identities, then each finding with the command that deals with it."""
    rows = result["identities"]
    if not rows:
        return [f"no agent identities in the {result['checked']['workspaces']} workspaces checked"]
    now = from_iso(result["now"])
    lines = fit_table(
        ["WORKSPACE", "IDENTITY", "STATUS", "FINDINGS", "LIVE", "NEWEST TOKEN", "NEXT EXPIRY", "LAST USED",
         "CREATED BY", "SCOPES"],
        lambda short: [[r["workspaceSlug"] or r["workspacePublicId"], r["slug"], r["status"],
                        ", ".join(r["findings"]) or None, str(r["liveTokens"]),
                        render_time(r["newestTokenAt"], now, short),
                        render_expiry(r["nextExpiry"], now, short) if r["liveTokens"] else None,
                        render_time(r["lastUsedAt"], now, short) or ("never" if not short else None),
                        r["createdBy"] or "(user gone)", ",".join(r["scopes"])] for r in rows],
        width, drop=("SCOPES", "CREATED BY", "NEWEST TOKEN", "NEXT EXPIRY"), shrink=("IDENTITY", "WORKSPACE"))
    for r in rows:
        for finding, action in zip(r["findings"], r["actions"]):
            lines.append(f"{r['workspaceSlug'] or r['workspacePublicId']}/{r['slug']}: {finding} "
                         f"({REVIEW_FINDINGS[finding][2]}): {action}")
    return lines


def review_csv(result: dict) -> list[list]:
    """review --csv: a header row, then one row per identity (findings and actions joined by ';')."""
    columns = ("workspacePublicId", "workspaceSlug", "slug", "publicId", "status", "scopes", "createdAt",
               "createdBy", "liveTokens", "newestTokenAt", "nextExpiry", "lastUsedAt", "findings", "actions")
    joined = ("scopes", "findings", "actions")
    return [list(columns)] + [["; ".join(row[c]) if c in joined else row[c] for c in columns]
                              for row in result["identities"]]


def render_audit(result: dict, width: int | None) -> list[str]:
    if not result["events"]:
        return [f"no audit events in workspace {result['workspacePublicId']} match"]
    now = from_iso(result["now"])
    return fit_table(
        ["WHEN", "ACTION", "IDENTITY", "TOKEN", "ACTOR", "REASON"],
        lambda short: [[render_time(e["createdAt"], now, short), e["action"], e["slug"], e["tokenPublicId"],
                        e["actorEmail"], e["reason"]] for e in result["events"]],
        width, drop=("TOKEN",), shrink=("REASON", "ACTOR", "IDENTITY"),
    )


def render_audit_head(result: dict) -> list[str]:
    lines = []
    for w in result["workspaces"]:
        name = f"{w['slug'] or w['workspacePublicId']} ({w['workspacePublicId']})"
        head = f"head {w['pin']} ({w['createdAt']})" if w["pin"] else "no chained events yet"
        unchained = f"; {w['unchained']} events not yet chained" if w["unchained"] else ""
        lines.append(f"{name}: {head}{unchained}")
    return lines


def render_audit_verify(result: dict) -> list[str]:
    lines = []
    for w in result["workspaces"]:
        name = f"{w['slug'] or w['workspacePublicId']} ({w['workspacePublicId']})"
        span = f" from {w['first']}" if w.get("first", 1) != 1 else ""
        checked = f"{w['events']} event{'' if w['events'] == 1 else 's'}{span}" + \
            (f", head {w['head']}" if w["head"] else "") + \
            (f", pinned {', '.join(w['pins'])} held" if w["pins"] and w["intact"] else "")
        if w["intact"]:
            lines.append(f"✓ {name}: intact, {checked}")
            continue
        for number, fault in enumerate(w["breaks"]):
            where = f" at {fault['sequence']}" if fault["sequence"] else ""
            lines.append(f"{'✗ ' + name + ': broken' if not number else '  and'}{where} ({fault['kind']}): "
                         f"{fault['message']}")
        lines.append(f"  checked {checked}")
    return lines


def render_doctor(result: dict) -> list[str]:
    lines = []
    for check in result["checks"]:
        mark = "!" if check.get("warning") else "✓" if check["ok"] else "✗"
        lines.append(f"{mark} {check['name']}: {check['detail']}")
        if check["fix"]:
            lines.append(f"  fix: {check['fix']}")
    return lines


def render_verify(result: dict) -> list[str]:
    token, identity = result["token"], result["identity"]
    verdict = "valid" if result["valid"] else f"not valid: {result['reason']}"
    if token is None:
        return [verdict]
    return [
        verdict,
        f"token      {token['publicId']}, scopes {','.join(token['scopes'])}, expiring {render_expiry(token['expiresAt'])}",
        f"identity   {render_identity_line(identity)}",
    ]


class View(collections.namedtuple("View", "lines notes summary")):
    """A result as a person reads it: lines for stdout, notes for stderr (after
    "agent-identity: "), and, when stdout carries a token alone for a secret manager,
    the summary that goes to stderr instead."""

    __slots__ = ()

    def __new__(cls, lines, notes=(), summary=()):
        return super().__new__(cls, list(lines), list(notes), list(summary))


def more(result: dict) -> list[str]:
    """The note that says how to read the next page, when there is one."""
    option = result.get("cursorOption", "--after")
    return [f"more: add {option} {result['nextCursor']}"] if result.get("nextCursor") else []


def view_text(result: dict, width: int | None) -> View:
    """help, schema and completion: their text, a line at a time."""
    return View(next(result[key] for key in ("text", "sql", "script") if key in result).rstrip("\n").split("\n"))


def view_mutation(result: dict, width: int | None) -> View:
    lines, notes = render_mutation(result)
    if (result.get("token") or {}).get("tokenFile") == "-":
        # Standard output is the token's alone, for a secret manager to read.
        secret = result["token"].get("secret")
        return View([secret] if secret else [], notes, lines)
    return View(lines, notes)


def view_inspect(result: dict, width: int | None) -> View:
    return View(render_inspect(result, width))


def view_list(result: dict, width: int | None) -> View:
    return View(render_list(result, width), more(result))


def view_workspaces(result: dict, width: int | None) -> View:
    return View(render_workspaces(result, width))


def view_expiring(result: dict, width: int | None) -> View:
    return View(render_expiring(result, width))


def view_review(result: dict, width: int | None) -> View:
    return View(render_review(result, width))


def view_audit(result: dict, width: int | None) -> View:
    """audit's events, or the chains of audit head and audit verify."""
    chains = {"audit head": render_audit_head, "audit verify": render_audit_verify}.get(result["command"])
    return View(chains(result)) if chains else View(render_audit(result, width), more(result))


def view_verify(result: dict, width: int | None) -> View:
    return View(render_verify(result))


def view_doctor(result: dict, width: int | None) -> View:
    return View(render_doctor(result))


# The marks of doctor's and audit verify's lines, and their colours on a terminal.
MARK_COLOURS = {"✓": 32, "✗": 31, "!": 33}


def csv_text(rows: list[list]) -> str:
    """RFC 4180 (CRLF line ends, quoted where needed), None as empty. Each cell passes
    visible(), as everything written for a person does (no control character reaches a
    terminal or a cell); one a spreadsheet would run as a formula (=, +, -, @ first) is
    prefixed with ' (OWASP's rule): a stored name cannot become a formula in an auditor's
    spreadsheet."""
    import csv
    import io

    def cell(value):
        text = "" if value is None else visible(str(value))
        return "'" + text if text[:1] in ("=", "+", "-", "@") else text

    buffer = io.StringIO()
    csv.writer(buffer).writerows([[cell(value) for value in row] for row in rows])
    return buffer.getvalue()


class Output:
    """Where results and diagnostics go: data on stdout, notes and errors on stderr.

    Everything written for a person passes visible(), so nothing stored or
    typed can drive the terminal; --json is pure ASCII (non-ASCII escaped), so it
    is valid UTF-8 JSON under any locale.
    """

    def __init__(self, stdout, stderr, as_json: bool, wide: bool = False, lines: bool = False,
                 signals: Signals | None = None, csv: bool = False):
        self.stdout = stdout
        self.stderr = stderr
        self.csv = csv  # review --csv: RFC 4180 rows
        self.signals = signals or SIGNALS
        self.as_json = as_json
        self.lines = lines  # audit --jsonl: one JSON event per line
        # Tables fit the terminal (80 columns when stdout is not one, unless COLUMNS says
        # otherwise); --wide prints them whole.
        if wide:
            self.width = None
        else:
            import shutil

            self.width = shutil.get_terminal_size().columns
        # A name with a ✓ must not fail a run whose locale is ASCII: what a stream cannot
        # encode is written as an escape (--json is ASCII already).
        for stream in (stdout, stderr):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(errors="backslashreplace")
        # Colour only on a terminal, and never when NO_COLOR is set (no-color.org).
        self.colour = not os.environ.get("NO_COLOR") and hasattr(stdout, "isatty") and stdout.isatty()

    def result(self, result: dict) -> None:
        self.notes(result.get("warnings", []))
        command = COMMANDS.get(result["command"].split()[0])
        if self.lines and command and command.jsonl:
            self.json_lines(result, command.jsonl)
            return
        if self.csv and command and command.csv:
            self._write(self.stdout, csv_text(command.csv(result)))
            return
        if self.as_json:
            self._json(result)
            return
        view = command.view(result, self.width)
        if view.summary:
            self._write(self.stderr, "".join(visible(line) + "\n" for line in view.summary))
        text = "".join(visible(line) + "\n" for line in view.lines)
        if self.colour and command.marks:  # the marks are ours: coloured after visible()
            text = re.sub("^([✓✗!])", lambda mark: f"\033[{MARK_COLOURS[mark[1]]}m{mark[1]}\033[0m", text, flags=re.M)
        self._write(self.stdout, text)
        self.notes(view.notes)

    def json_lines(self, result: dict, key: str) -> None:
        """--jsonl: each row of result[key] a line of ASCII JSON, a page per write, as pages
        are read (result["later"] gives the pages after the first)."""
        import json

        for page in itertools.chain([result[key]], result.get("later", ())):
            if page:
                with self.signals.whole():  # a reader gets whole lines, whatever stops the stream
                    self._write(self.stdout, "".join(json.dumps(row) + "\n" for row in page))
        self.notes(more(result))

    def notes(self, notes: list[str]) -> None:
        for note in notes:
            self._write(self.stderr, visible(f"{PROG}: {note}") + "\n")

    def error(self, command: str | None, error: AdminError) -> None:
        """Say what failed: on stdout as JSON with --json, else on stderr. Never raises."""
        message = scrub_tokens(error.message)
        try:
            if self.as_json:
                self._json({
                    "ok": False,
                    "command": command,
                    "error": {"code": error.exit_code, "kind": EXIT_KINDS[error.exit_code], "message": message},
                })
                return
        except (OSError, ValueError):
            self.quiet_stdout()  # stdout is what failed: fall back to stderr
        self.complain(message)

    def complain(self, message: str) -> None:
        """One error line (already scrubbed) on stderr, whatever the mode; if stderr is gone too, nothing."""
        with contextlib.suppress(OSError, ValueError):
            self._write(self.stderr, visible(f"{PROG}: error: {message}") + "\n")

    def quiet_stdout(self) -> None:
        """After stdout failed: point it at /dev/null, so that what it still buffers
        (flushed again at exit) cannot fail a second time."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stdout.fileno())
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.stdout.flush()

    def _json(self, payload: dict) -> None:
        import json

        self._write(self.stdout, json.dumps(payload) + "\n")

    @staticmethod
    def _write(stream, text: str) -> None:
        """One write and a flush, so a failure shows here, not at exit. A real stream gets
        the bytes, a short write at a time if need be: an unbuffered one (PYTHONUNBUFFERED)
        that a signal interrupts part-way would otherwise drop the rest unseen."""
        if stream is None:  # the descriptor was closed when the tool started (>&-)
            import errno

            raise OSError(errno.EBADF, "the stream is closed")
        raw = getattr(stream, "buffer", None)
        if raw is None:
            stream.write(text)
            stream.flush()
            return
        stream.flush()
        data = memoryview(text.encode(stream.encoding or "utf-8", stream.errors or "strict"))
        while data:
            written = raw.write(data)
            if written is None:  # a non-blocking stream that would block: say so, as a failed write
                raise BlockingIOError("the output would block")
            data = data[written:]
        raw.flush()


# --- Command line -----------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises AdminError instead of printing and exiting."""

    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str):
        invalid = re.match(r"argument COMMAND: invalid choice: '(.*)' \(choose from", message)
        if invalid:
            message = f"unknown command {quote(invalid[1])}{did_you_mean(invalid[1], self.commands)}"
        raise AdminError(EXIT_USAGE, f"{message} (see `{self.prog} --help`)")

    def check_options(self, argv: list[str]) -> None:
        """Name an unknown option before argparse says something else is missing: a typo
        (--slgu) is the mistake, not the --slug it left out."""
        command = command_in(argv)
        if command is None:
            return  # no command to check against: argparse says what is wrong
        known = set(self._option_string_actions) | set(self.commands[command]._option_string_actions)
        for arg in argv:
            if arg == "--":
                return
            option = arg.split("=", 1)[0]
            if option.startswith("--") and option not in known:
                raise AdminError(EXIT_USAGE, f"unknown option {quote(option)}{did_you_mean(option, known)} "
                                             f"(see `{PROG} {command} --help`)")


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", metavar="URL", type=parse_database_url,
                        help="PostgreSQL URL (default: DATABASE_URL, else POSTGRES_URL, else libpq's PG* variables)")
    parser.add_argument("--admin-user-email", metavar="EMAIL",
                        help="the Kan user you act as (default: AGENT_IDENTITY_ADMIN_EMAIL; a login of "
                             "your own needs neither: it says who you are)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--lock-timeout", type=parse_lock_timeout, metavar="SECONDS",
                        help=f"how long to wait while another session changes the same identity "
                             f"(default {LOCK_TIMEOUT_DEFAULT}); then exit 5, nothing written")
    parser.add_argument("--db-schema", type=parse_db_schema, metavar="NAME",
                        help="the PostgreSQL schema that holds Kan's tables (default: AGENT_IDENTITY_DB_SCHEMA, "
                             "else found through the search_path as Kan finds it; schema: public)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")


# The options commands share, each added by one function.


def workspace_options(sub, *, required: bool = True, help_text: str = "the Kan workspace") -> None:
    """--workspace-public-id W, or --workspace W (a slug, as in Kan's URLs, or a public id)."""
    group = sub.add_mutually_exclusive_group(required=required)
    group.add_argument("--workspace-public-id", type=parse_public_id, metavar="W", help=f"{help_text}: its public id")
    group.add_argument("--workspace", type=parse_workspace, metavar="W",
                       help=f"{help_text}: its slug or public id (a public id wins if both match)")


def slug_option(sub, *, required: bool = True) -> None:
    sub.add_argument("--slug", required=required, type=parse_slug, metavar="S",
                     help="the identity's slug, unique in its workspace")


def change_options(sub) -> None:
    """What every command that changes the database takes."""
    sub.add_argument("--reason", type=parse_reason, metavar="R", help="why, for the audit log")
    sub.add_argument("--confirm", action="store_true", help="make the change")
    sub.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")


def token_options(sub, expires_default: str | None, expires_help: str) -> None:
    """What create and rotate share: how long the new token lives, and where it goes."""
    sub.add_argument("--expires-in", type=parse_expires_in, default=expires_default, metavar="DURATION",
                     help=f"30m, 12h, 90d, 1w ... at most 365d, or never ({expires_help})")
    sub.add_argument("--token-file", metavar="PATH", type=parse_path,
                     help="write the token to this new file (mode 0600); - writes only the token to "
                          "stdout, for a secret manager, and the summary to stderr")


def identity_options(sub, *, by_token: str | None = None) -> None:
    """The workspace and the identity in it; with by_token (its help), --token may name the
    identity instead, and then the workspace and the slug are optional."""
    workspace_options(sub, required=not by_token)
    slug_option(sub, required=not by_token)
    if by_token:
        sub.add_argument("--token", type=parse_token_id, metavar="TOKEN_ID", help=by_token)


def wide_option(sub) -> None:
    sub.add_argument("--wide", action="store_true", help="print the tables whole, however wide the terminal")


def bulk_option(sub) -> None:
    sub.add_argument("--all", action="store_true",
                     help="every identity of the workspace this applies to, in one transaction")


# Each command's own options.


def help_options(sub, parser) -> None:
    sub.add_argument("topic", nargs="?", metavar="COMMAND")
    sub.set_defaults(parser=parser)  # the text help prints is this parser's own


def no_options(sub, parser) -> None:
    pass


def completion_options(sub, parser) -> None:
    sub.add_argument("shell", choices=("bash", "zsh", "fish"))


def create_options(sub, parser) -> None:
    identity_options(sub)
    change_options(sub)
    sub.add_argument("--display-name", required=True, type=parse_display_name, metavar="D")
    sub.add_argument("--token-name", required=True, type=parse_display_name, metavar="T")
    sub.add_argument("--scopes", required=True, type=parse_scopes, metavar="a,b",
                     help=f"comma-separated, from: {', '.join(SCOPES)}")
    token_options(sub, EXPIRES_DEFAULT, f"default {EXPIRES_DEFAULT}")


def rotate_options(sub, parser) -> None:
    identity_options(sub)
    change_options(sub)
    sub.add_argument("--token-name", type=parse_display_name, metavar="T",
                     help="name of the new token (default: the old one's)")
    sub.add_argument("--grace", type=parse_grace, default="0", metavar="DURATION",
                     help="let the old live tokens work this much longer instead of revoking them "
                          "(at most 7d; default 0: revoke at once)")
    sub.add_argument("--scopes", type=parse_scopes, metavar="a,b",
                     help="the new token's scopes (default: the old one's)")
    token_options(sub, None, "default: the lifetime the rotated token was issued with")


def status_options(sub, parser) -> None:
    """pause and resume: one identity, or --all."""
    workspace_options(sub, required=False)
    slug_option(sub, required=False)
    change_options(sub)
    bulk_option(sub)


def resume_options(sub, parser) -> None:
    """resume: one identity, --all, or exactly those one pause --all paused."""
    status_options(sub, parser)
    sub.add_argument("--batch", type=parse_public_id, metavar="BATCH_ID",
                     help="exactly the identities this pause --all paused that are still paused by it")


def revoke_options(sub, parser) -> None:
    identity_options(sub, by_token="revoke only this token (its public id, or kan_agent_<id>), leaving the "
                                   "identity alone; it names the identity and workspace too")
    change_options(sub)
    bulk_option(sub)


def inspect_options(sub, parser) -> None:
    identity_options(sub, by_token="the identity holding this token (its public id, or kan_agent_<id>), in any "
                                   "workspace you manage")
    sub.add_argument("--events", type=parse_event_count, default=EVENTS_DEFAULT, metavar="N",
                     help=f"how many audit events to show (default {EVENTS_DEFAULT})")
    wide_option(sub)


def list_options(sub, parser) -> None:
    workspace_options(sub)
    sub.add_argument("--status", choices=STATUSES)
    sub.add_argument("--limit", type=parse_list_limit, default=LIST_LIMIT_DEFAULT, metavar="N",
                     help=f"identities per page (default {LIST_LIMIT_DEFAULT}, at most {LIST_LIMIT_MAX})")
    sub.add_argument("--after", type=parse_public_id, metavar="PUBLIC_ID",
                     help="start after this identity: the nextCursor of the previous page")
    wide_option(sub)


def audit_options(sub, parser) -> None:
    workspace_options(sub, required=False)
    sub.add_argument("mode", nargs="?", choices=("verify", "head"), metavar="verify|head",
                     help="verify: recompute every audit chain (the workspace's, or every one you manage) and "
                          f"exit {EXIT_CHAIN_BROKEN} at a break; head: print each chain's head, SEQUENCE:HASH, "
                          "to pin")
    sub.add_argument("--expect-head", type=parse_pin, action="append", metavar="WORKSPACE:SEQ:HASH",
                     help="with verify: also fail unless the workspace's chain still holds this head, as audit "
                          "head printed it earlier (repeatable)")
    sub.add_argument("--expect-heads", type=parse_path, action="append", metavar="PATH",
                     help="with verify: every pin in this file (audit head's output, kept over time) of a "
                          "workspace verified")
    sub.add_argument("--file", type=parse_path, action="append", metavar="EXPORT",
                     help="with verify: verify an audit --jsonl export, with no database (repeatable, oldest "
                          "first: an event two exports disagree on is a break)")
    sub.add_argument("--after-sequence", type=parse_position, action="append", metavar="[WORKSPACE:]N",
                     help="list in chain order, oldest first, after this sequence number: where a shipper "
                          "stopped (with no workspace, WORKSPACE:N, repeatable)")
    sub.add_argument("--since", type=parse_moment, metavar="WHEN",
                     help="only events at or after WHEN: a duration back from now (24h, 7d) or an ISO time "
                          "(UTC unless it says otherwise)")
    sub.add_argument("--until", type=parse_moment, metavar="WHEN", help="only events before WHEN (as --since)")
    sub.add_argument("--actor", type=parse_email, metavar="EMAIL", help="only what this Kan user did")
    sub.add_argument("--action", type=parse_action, action="append", metavar="ACTION",
                     help=f"only this action (repeatable): {', '.join(AUDIT_ACTIONS)}")
    sub.add_argument("--slug", type=parse_slug, metavar="S", help="only events about this identity")
    sub.add_argument("--token", type=parse_token_id, metavar="TOKEN_ID",
                     help="only events about this token (its public id, or kan_agent_<id>); it names the "
                          "workspace too")
    sub.add_argument("--limit", type=parse_list_limit, metavar="N",
                     help=f"events per page (default {LIST_LIMIT_DEFAULT}; {LIST_LIMIT_MAX} with --all; "
                          f"at most {LIST_LIMIT_MAX})")
    sub.add_argument("--after", type=parse_public_id, metavar="EVENT_ID",
                     help="start after this event: the nextCursor of the previous page")
    sub.add_argument("--jsonl", action="store_true", help="print one JSON event per line, as read (for a SIEM or jq)")
    sub.add_argument("--all", action="store_true", help="with --jsonl: every page, streamed, not only the first; "
                                                        "with no workspace, every chain you manage, oldest first")
    wide_option(sub)


def expiring_options(sub, parser) -> None:
    workspace_options(sub, required=False, help_text="only this workspace")
    sub.add_argument("--within", type=parse_within, default=EXPIRING_WITHIN_DEFAULT, metavar="DURATION",
                     help=f"how soon: 30m, 12h, 7d, 2w ... (default {EXPIRING_WITHIN_DEFAULT}); "
                          f"exit {EXIT_EXPIRING} when any is found, or an active identity has no live token")
    sub.add_argument("--include-superseded", action="store_true",
                     help="also tokens a rotation with --grace left to run out (their expiry is meant)")


def review_options(sub, parser) -> None:
    workspace_options(sub, required=False, help_text="only this workspace")
    sub.add_argument("--idle", type=parse_within, default=parse_within(REVIEW_IDLE_DEFAULT), metavar="DURATION",
                     help=f"unused: no token used within this long (default {REVIEW_IDLE_DEFAULT})")
    sub.add_argument("--max-age", type=parse_within, default=parse_within(REVIEW_MAX_AGE_DEFAULT),
                     metavar="DURATION",
                     help=f"stale: the newest live token issued longer ago (default {REVIEW_MAX_AGE_DEFAULT})")
    sub.add_argument("--include-revoked", action="store_true", help="also revoked identities (never a finding)")
    formats = sub.add_mutually_exclusive_group()
    formats.add_argument("--csv", action="store_true", help="RFC 4180 CSV, a header row, one row per identity")
    formats.add_argument("--jsonl", action="store_true", help="one JSON identity per line")
    wide_option(sub)


def doctor_options(sub, parser) -> None:
    workspace_options(sub, required=False, help_text="also check that the actor may manage this workspace")


def verify_options(sub, parser) -> None:
    workspace_options(sub, required=False, help_text="the workspace the token must belong to (default: the token's own)")
    sub.add_argument("--token-file", metavar="PATH", type=parse_path,
                     help="read the token from this file instead of stdin")


# The checks argparse cannot make: across a command's arguments. Each raises exit 2.


def token_to_stdout_alone(args: argparse.Namespace) -> None:
    """--token-file - writes the token alone to standard output, for a secret manager to
    read: never to a screen, and never a preview's nothing in its place."""
    if args.token_file != "-":
        return
    if args.json:
        raise AdminError(EXIT_USAGE, "give --json or --token-file -, not both: with --token-file -, standard "
                                     "output carries the token alone, for a secret manager to read")
    if args.dry_run:
        raise AdminError(EXIT_USAGE, "--token-file - with --dry-run would pipe nothing where a token is awaited: "
                                     "preview with --dry-run alone, then run the pipeline with --confirm")
    if sys.stdout is not None and sys.stdout.isatty():
        raise AdminError(EXIT_USAGE, "--token-file - would print the token on this terminal: pipe standard output "
                                     "into the secret manager, or give --token-file PATH")


def slug_or_token(args: argparse.Namespace) -> None:
    """inspect names its identity one way."""
    if args.slug and args.token:
        raise AdminError(EXIT_USAGE, f"give --slug or --token, not both (see `{PROG} inspect --help`)")


def one_identity(args: argparse.Namespace) -> None:
    """--slug, --token or --all (revoke takes --slug with --token), and a workspace unless
    --token names it: what is missing is named as it is missing."""
    chosen = [flag for flag in ("slug", "token", "all", "batch") if getattr(args, flag, None)]
    if len(chosen) > 1 and chosen != ["slug", "token"]:
        raise AdminError(EXIT_USAGE, f"give one of --{' or --'.join(chosen)}, not both "
                                     f"(see `{PROG} {args.command} --help`)")
    if getattr(args, "token", None):
        return
    by_token = " (or --token)" if hasattr(args, "token") else ""
    many = "".join(f" or --{flag}" for flag in ("all", "batch") if hasattr(args, flag))
    missing = [what for what, given in (
        ("--workspace-public-id or --workspace" + by_token, Ref.of(args).workspace),
        ("--slug" + many + by_token, chosen),
    ) if not given]
    if missing:
        raise AdminError(EXIT_USAGE, f"the following arguments are required: {'; '.join(missing)} "
                                     f"(see `{PROG} {args.command} --help`)")


def one_format(args: argparse.Namespace) -> None:
    """One output: --json, --jsonl or --csv."""
    given = [flag for flag in ("json", "jsonl", "csv") if getattr(args, flag, False)]
    if len(given) > 1:
        raise AdminError(EXIT_USAGE, f"give one of --{' or --'.join(given)}, not both")


def audit_arguments(args: argparse.Namespace) -> None:
    """audit lists events, or (verify, head) looks at whole chains: each takes its own options."""
    named = Ref.of(args).workspace
    listing = [option for option, value in (
        ("--since", args.since), ("--until", args.until), ("--actor", args.actor), ("--action", args.action),
        ("--slug", args.slug), ("--token", args.token), ("--limit", args.limit), ("--after", args.after),
        ("--after-sequence", args.after_sequence), ("--jsonl", args.jsonl), ("--all", args.all)) if value]
    pinning = [option for option, value in (("--expect-head", args.expect_head), ("--expect-heads", args.expect_heads),
                                            ("--file", args.file)) if value]
    if args.mode and listing:
        raise AdminError(EXIT_USAGE, f"audit {args.mode} looks at whole chains: {listing[0]} is for listing "
                                     f"events (see `{PROG} audit --help`)")
    if args.mode != "verify" and pinning:
        raise AdminError(EXIT_USAGE, f"{pinning[0]} goes with audit verify (see `{PROG} audit --help`)")
    if args.mode:
        return
    if not (named or args.token or (args.jsonl and args.all)):
        raise AdminError(EXIT_USAGE, "the following arguments are required: --workspace-public-id or --workspace "
                                     f"(or --token, or --jsonl --all for every workspace) (see `{PROG} audit --help`)")
    filters = [option for option in listing if option not in ("--limit", "--jsonl", "--all", "--after-sequence")]
    if args.after_sequence is not None or not (named or args.token):
        if filters:  # an export in chain order is whole, to be verified
            raise AdminError(EXIT_USAGE, f"{filters[0]} filters a listing: the chain, in order, is listed whole "
                                         "(with --after-sequence, or with no workspace)")
        if named and (len(args.after_sequence) > 1):
            raise AdminError(EXIT_USAGE, "give --after-sequence once for one workspace")
        if not named and any(position.workspace is None for position in args.after_sequence or ()):
            raise AdminError(EXIT_USAGE, "with no workspace, --after-sequence takes WORKSPACE:N")
    if args.all and not args.jsonl:
        raise AdminError(EXIT_USAGE, "--all streams every page, one event per line: give it with --jsonl")
    if args.json and args.jsonl:
        raise AdminError(EXIT_USAGE, "give --json (one object, one page) or --jsonl (one event per line), not both")


# A result's exit code, for the commands whose result is a verdict.


def verify_verdict(result: dict) -> int:
    return EXIT_OK if result["valid"] else EXIT_INVALID_TOKEN


def doctor_verdict(result: dict) -> int:
    return EXIT_OK if result["healthy"] else EXIT_DATABASE


def expiring_verdict(result: dict) -> int:
    return EXIT_EXPIRING if result["tokens"] or result["down"] else EXIT_OK


def review_verdict(result: dict) -> int:
    return EXIT_FINDINGS if any(identity["findings"] for identity in result["identities"]) else EXIT_OK


def audit_verdict(result: dict) -> int:
    """audit verify's: every chain intact (a listing or a head has no verdict)."""
    return EXIT_CHAIN_BROKEN if result.get("intact") is False else EXIT_OK


class Command(collections.namedtuple(
        "Command", "name summary run view options checks verdict database changes token before jsonl marks csv "
                   "examples",
        defaults=((), None, True, False, False, None, None, False, None, ""))):
    """One command, and everything that makes it one: its name and one-line summary (its
    help line and description), the function that runs it and the one that shows its
    result (view), the function that adds its options, its cross-argument checks, its
    verdict (result -> exit code; None: always 0), and what it is: database (run gets a
    Database; else run(args)), changes (it writes: --confirm or --dry-run), token (a
    token passes through the process: no core file), before (what it reads before any
    connection, given to run: a dict, or {"verdict": result} to stop there), jsonl (the
    key of the rows --jsonl streams), marks (its lines begin ✓, ✗ or !), csv (result ->
    the rows --csv writes, its header first), and its examples. The parser, help, completion, dispatch, confirmation, output and exit code
    all come from here."""

    __slots__ = ()


COMMANDS = {c.name: c for c in (
    Command("help", "show usage for the tool or one command", cmd_help, view_text, help_options, database=False,
            examples="""\
example:
  agent-identity help rotate"""),
    Command("schema", "print the SQL that creates the agent tables (idempotent)", cmd_schema, view_text,
            no_options, database=False, examples="""\
examples:
  agent-identity schema | psql --single-transaction -v ON_ERROR_STOP=1 \\
      "$POSTGRES_URL"
  agent-identity schema --db-schema kan | psql --single-transaction \\
      -v ON_ERROR_STOP=1 "$POSTGRES_URL"
Apply it as the owner of Kan's tables: it also indexes Kan's workspace_members."""),
    Command("completion", "print a shell completion script (bash, zsh or fish)", cmd_completion, view_text,
            completion_options, database=False, examples="""\
examples:
  source <(agent-identity completion bash)         # in ~/.bashrc
  agent-identity completion zsh > agent-identity.zsh   # source it in ~/.zshrc
  agent-identity completion fish > agent-identity.fish
      # into ~/.config/fish/completions/"""),
    Command("create", "create an active identity and its first token", cmd_create, view_mutation, create_options,
            checks=(token_to_stdout_alone,), changes=True, token=True, examples="""\
examples:
  agent-identity create --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --display-name "Release bot" --token-name ci \\
      --scopes boards:read,cards:write --reason "ticket OPS-12" --dry-run
  agent-identity create ... --expires-in 30d --token-file release-bot.token \\
      --confirm
  agent-identity create ... --token-file - --confirm | vault kv put \\
      secret/kan/release-bot token=-     # only the token goes to stdout"""),
    Command("rotate", "issue a new token; revoke the old ones, or give them a grace", cmd_rotate, view_mutation,
            rotate_options, checks=(token_to_stdout_alone,), changes=True, token=True, examples="""\
examples:
  agent-identity rotate --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --reason "leaked in a log" --confirm
  agent-identity rotate --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --grace 1h --token-file new.token --confirm   # the old token works 1h
  agent-identity rotate --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --token-name ci-2025 --dry-run"""),
    Command("pause", "pause an active identity (its tokens stop working until resumed)", cmd_set_status,
            view_mutation, status_options, checks=(one_identity,), changes=True, examples="""\
examples:
  agent-identity pause --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --reason "investigating" --confirm
  agent-identity pause --workspace-public-id Ab12Cd34Ef56 --all \\
      --reason "incident" --confirm     # every active identity, one transaction"""),
    Command("resume", "resume a paused identity", cmd_set_status, view_mutation, resume_options,
            checks=(one_identity,), changes=True, examples="""\
examples:
  agent-identity resume --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --confirm
  agent-identity resume --workspace acme-eng --batch Bt12Bt34Bt56 --dry-run
      # exactly what one pause --all paused (its batch id), not others
  agent-identity resume --workspace acme-eng --all --dry-run"""),
    Command("revoke", "revoke an identity and all its tokens for good, or with --token one token", cmd_revoke,
            view_mutation, revoke_options, checks=(one_identity,), changes=True, examples="""\
examples:
  agent-identity revoke --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --reason "retired" --confirm
  agent-identity revoke --token Tk12Tk34Tk56 --reason "leaked" --confirm"""),
    Command("inspect", "show an identity, its tokens and its latest audit events", cmd_inspect, view_inspect,
            inspect_options, checks=(slug_or_token, one_identity), examples="""\
examples:
  agent-identity inspect --workspace-public-id Ab12Cd34Ef56 --slug release-bot
  agent-identity inspect --token kan_agent_Tk12Tk34Tk56   # whose token is this?
  agent-identity inspect --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --events 50 --json"""),
    Command("list", "list a workspace's identities, newest first, a page at a time", cmd_list, view_list,
            list_options, examples="""\
examples:
  agent-identity list --workspace-public-id Ab12Cd34Ef56
  agent-identity list --workspace-public-id Ab12Cd34Ef56 --status active --json
  agent-identity list --workspace-public-id Ab12Cd34Ef56 --limit 100 \\
      --after Xy12Xy34Xy56"""),
    Command("audit", "show a workspace's audit events, newest first; verify its hash chain", cmd_audit, view_audit,
            audit_options, checks=(audit_arguments,), verdict=audit_verdict, before=audit_inputs, jsonl="events",
            marks=True, examples="""\
examples:
  agent-identity audit --workspace acme-eng --since 24h   # the last 24 hours
  agent-identity audit --workspace acme-eng --action access.denied --since 7d
  agent-identity audit --token Tk12Tk34Tk56   # a token's whole story
  agent-identity audit --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --since 2026-11-01 --until 2026-12-01 --json
  agent-identity audit --jsonl --all > audit.jsonl   # every chain you manage
  agent-identity audit --workspace acme-eng --jsonl --all \\
      --after-sequence 1200 >> acme-eng-audit.jsonl   # from where it stopped
  agent-identity audit verify           # every chain you manage; 10 at a break
  agent-identity audit head >> pinned-heads.txt   # keep it off the database
  agent-identity audit verify --expect-heads pinned-heads.txt
  agent-identity audit verify --file audit.jsonl   # the export, offline
Times are UTC; --since and --until take a duration back from now or an ISO time."""),
    Command("workspaces", "list the workspaces you may manage, with their identities and tokens", cmd_workspaces,
            view_workspaces, no_options, examples="""\
examples:
  agent-identity workspaces
  agent-identity workspaces --json"""),
    Command("expiring", "list tokens that expire soon, and agents left with none",
            cmd_expiring, view_expiring, expiring_options, verdict=expiring_verdict, examples="""\
examples:
  agent-identity expiring              # every workspace you manage, 7 days
  agent-identity expiring --workspace acme-eng --within 30d --json
Exit 9 when any token expires within the window, or an active identity has no
live token left (for a cron job); 0 when none."""),
    Command("review", "review every agent you manage: what it holds, who made it, and what to act on",
            cmd_review, view_review, review_options, checks=(one_format,), verdict=review_verdict,
            jsonl="identities", csv=review_csv, examples="""\
examples:
  agent-identity review                       # every workspace you manage
  agent-identity review --workspace acme-eng --idle 14d --max-age 30d
  agent-identity review --csv > access-review.csv   # for the auditor
Findings: never-expires, unused (--idle, 30d), stale (--max-age, 90d),
orphaned (nobody who still manages the workspace made it or issued its token).
Exit 11 when any identity has a finding; 0 when none; 4 if you manage none."""),
    # doctor connects by itself: a connection that fails is one of its checks.
    Command("doctor", "check the connection, tables, row level security and your access", cmd_doctor,
            view_doctor, doctor_options, verdict=doctor_verdict, database=False, marks=True, examples="""\
examples:
  agent-identity doctor
  agent-identity doctor --workspace-public-id Ab12Cd34Ef56 \\
      --admin-user-email you@example.com
Exit 0 when every check passes, 6 otherwise."""),
    Command("verify", "say whether the server would accept a token (read from stdin), and if not, why", cmd_verify,
            view_verify, verify_options, verdict=verify_verdict, token=True, before=read_presented, examples="""\
examples:
  agent-identity verify < release-bot.token
  agent-identity verify --token-file release-bot.token \\
      --workspace-public-id Ab12Cd34Ef56 --json
The token is read from standard input or a file, never from the command line;
exit 0 when valid, 7 when not."""),
)}
MAIN_EPILOG = f"""\
Every command but help, schema and completion needs a database (--database-url,
DATABASE_URL or POSTGRES_URL) and an actor who holds workspace:manage in the
workspace: a maintainer's own login says who that is; the shared role is told
(--admin-user-email or AGENT_IDENTITY_ADMIN_EMAIL).
Commands that change anything need --confirm, or --dry-run to preview.

{EXIT_CODES_HELP}

Run `{PROG} help COMMAND` for a command's options and examples."""


class Unbuilt:
    """A command this run will not parse or show: listed by name and help line, its
    options not added (argparse spends most of a help's or usage error's time adding them)."""

    def add_argument(self, *args, **kwargs) -> None:
        pass

    def set_defaults(self, **kwargs) -> None:
        pass

    def add_mutually_exclusive_group(self, **kwargs) -> "Unbuilt":
        return self


def build_parser(wanted: set[str] | None = None) -> ArgumentParser:
    """The whole command line, from COMMANDS; with wanted, only those commands get their
    options (the others are listed, and cannot be parsed or shown in this run)."""
    # The global options are accepted after the command name too; there they
    # default to SUPPRESS so they do not overwrite values given before it.
    global_options = ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS, allow_abbrev=False)
    add_global_options(global_options)
    parser = ArgumentParser(prog=PROG, description="Manage the machine identities of AI agents in a Kan database.",
                            epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_global_options(parser)
    parser.set_defaults(lock_timeout=parse_lock_timeout(LOCK_TIMEOUT_DEFAULT), dry_run=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        if wanted is not None and command.name not in wanted:
            subparsers.add_parser(command.name, help=command.summary, add_help=False)
            continue
        sub = subparsers.add_parser(
            command.name, help=command.summary, description=command.summary, parents=[global_options],
            epilog=command.examples + "\n\n" + EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False)
        command.options(sub, parser)
    parser.commands = dict(subparsers.choices)
    return parser


def command_in(argv: list[str]) -> str | None:
    """The command an argument list names: its first word that is one."""
    return next((arg for arg in argv if arg in COMMANDS), None)


# --- main -------------------------------------------------------------------


def check_arguments(command: Command, args: argparse.Namespace) -> None:
    """The checks argparse cannot make, before anything else is done: a change needs
    exactly one of --confirm and --dry-run; then the command's own."""
    if command.changes:
        if args.confirm and args.dry_run:
            raise AdminError(EXIT_USAGE, "give --confirm or --dry-run, not both")
        if not (args.confirm or args.dry_run):
            raise AdminError(EXIT_USAGE, f"{command.name} changes the database: add --confirm to do it, or "
                                         "--dry-run to see what it would do")
    for check in command.checks:
        check(args)


def run(args: argparse.Namespace) -> dict:
    """Check the arguments, then run the command: offline, or through a connection."""
    command = COMMANDS[args.command]
    check_arguments(command, args)
    if not command.database:
        return command.run(args)
    if command.token:
        forbid_core_dumps()  # before a token exists in this process
    given = command.before(args) if command.before else {}
    if "verdict" in given:  # decided with no database: a malformed token is refused before any connection
        return given["verdict"]
    return run_connected(command, args, claimed_actor(args), given)


def run_connected(command: Command, args: argparse.Namespace, claim: str | None, given: dict) -> dict:
    """Run a database command as its actor (the login's, or the claim): its refusals audited,
    its database errors made one line and an exit code; a change says where it wrote."""
    import psycopg

    conn = connect(database_url(args))
    db, target, result = Database(conn, args, claim), target_of(conn), {}
    try:
        result = command.run(db, args, **given)
    except AccessDenied as denied:
        if not args.dry_run:
            record_denial(db, args, denied)
        raise
    except psycopg.Error as exc:
        holders = lock_holders(conn, exc, db.schema) if isinstance(exc, psycopg.errors.LockNotAvailable) else ""
        raise database_error(exc, args.lock_timeout, target, holders) from exc
    finally:
        if "later" not in result:  # audit --all reads its later pages as it prints them, then closes
            conn.close()
    if command.changes:
        result["target"] = target  # where it wrote (or would have): staging or production?
    return result


def exit_code(result: dict) -> int:
    """A result's exit code: its command's verdict, or success."""
    command = COMMANDS[result["command"].split()[0]]
    return command.verdict(result) if command.verdict else EXIT_OK


def deliver(out: Output, result: dict, code: int) -> int:
    """Print a result. If stdout fails (closed, full, a reader gone, an encoding it
    cannot take) or a signal comes, say so on stderr and return the exit code that
    tells: after a committed change, that it was committed and what to do; verify
    keeps its verdict; a read ends 141 on a closed pipe, else 8."""
    try:
        out.result(result)
        return code
    except (OSError, ValueError, KeyboardInterrupt) as exc:
        out.signals.arm(0, None)  # a signal acted: its follow-up must not cut what is said here short
        out.quiet_stdout()
        command = COMMANDS.get(result["command"].split()[0])
        if command and command.changes and result["changed"] and not result["dryRun"]:
            error = undelivered(command.name, "its output could not be written", exc)
            out.complain(scrub_tokens(error.message))
            return error.exit_code
        if isinstance(exc, KeyboardInterrupt):
            raise
        if command and command.name == "verify":  # its verdict stands whoever reads it
            return code
        if isinstance(exc, BrokenPipeError):
            return EXIT_BROKEN_PIPE  # `list | head`: the reader has what it wanted; say nothing
        out.complain(scrub_tokens(f"the output could not be written: "
                                  f"{exc.strerror if isinstance(exc, OSError) else first_line(exc)}"))
        return EXIT_UNDELIVERED


def json_help(parser: ArgumentParser, argv: list[str], out: Output) -> int:
    """--help or --version with --json: argparse's text, as one JSON object."""
    import io

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pass
    command = "version" if "--version" in argv else "help"
    return deliver(out, {"command": command, "ok": True, "text": captured.getvalue()}, EXIT_OK)


def debug_traceback(argv: list[str], out: Output) -> None:
    """--debug: the traceback of the error being handled (and what caused it), on stderr."""
    if "--debug" in argv:
        import traceback

        with contextlib.suppress(OSError, ValueError):
            traceback.print_exc(file=out.stderr)


def main(argv: list[str] | None = None, stdout=None, stderr=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    out = Output(sys.stdout if stdout is None else stdout, sys.stderr if stderr is None else stderr,
                 as_json="--json" in argv, wide="--wide" in argv, lines="--jsonl" in argv, csv="--csv" in argv)
    command = command_in(argv)  # named in a usage error's JSON even when argparse refuses the rest
    try:
        with out.signals.installed():
            parser = build_parser(wanted=set(argv) & set(COMMANDS))
            parser.check_options(argv)
            if out.as_json and {"-h", "--help", "--version"} & set(argv):
                return json_help(parser, argv, out)
            args = parser.parse_args(argv)
            command = args.command
            result = run(args)
            code = exit_code(result)
            result["ok"] = code == EXIT_OK  # the one rule: ok is true exactly when the exit code is 0
            return deliver(out, result, code)
    except AdminError as exc:
        debug_traceback(argv, out)
        out.error(command, exc)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if out.signals.committed and command in COMMANDS:  # after its commit, before its result was shown
            error = undelivered(command, "it was interrupted before its result was shown", exc)
            out.error(command, error)
            return error.exit_code
        code = exit_code_of_interrupt(exc)
        out.error(command, AdminError(code, "interrupted; a change not yet committed was rolled back"))
        return code
    except ImportError as exc:
        # psycopg and argon2 are imported only when needed, so this is where their absence shows.
        out.error(command, AdminError(
            EXIT_INTERNAL,
            f"{exc.name or 'a dependency'} is not installed for {sys.executable}: "
            "pip install 'psycopg[binary]>=3.2' 'argon2-cffi>=23.1' (or run the installed agent-identity)",
        ))
        return EXIT_INTERNAL
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except Exception as exc:
        debug_traceback(argv, out)
        out.error(command, AdminError(
            EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {first_line(exc)} (rerun with --debug)"
        ))
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
