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

__version__ = "0.3.0"

PROG = "agent-identity"
APPLICATION_NAME = "agent-identity"

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
DURATION_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
DURATION_RE = re.compile(r"(?P<count>[0-9]{1,6})(?P<unit>[mhdw])")

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

# A PostgreSQL schema name as `schema --db-schema` takes it: a plain identifier.
DB_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
SLUG_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
PUBLIC_ID_RE = re.compile(r"[0-9A-Za-z]{%d}" % PUBLIC_ID_LENGTH)
TOKEN_RE = re.compile(
    r"%s(?P<public_id>[0-9A-Za-z]{%d})_(?P<secret>[0-9A-Za-z]{%d,})(?P<checksum>[0-9A-Za-z]{%d})"
    % (TOKEN_PREFIX, PUBLIC_ID_LENGTH, SECRET_LENGTH, CHECKSUM_LENGTH)
)
# Anything that looks like one of our tokens, well formed or not: scrubbed
# from every error message before it is printed.
TOKEN_LIKE_RE = re.compile(TOKEN_PREFIX + r"[0-9A-Za-z_]*")
# A token with any of its secret: refused in every value the tool would store
# or echo. The prefix and public id alone (kan_agent_Ab12Cd34Ef56) name a
# token without revealing it, and may be written anywhere.
SECRET_BEARING_RE = re.compile(TOKEN_PREFIX + r"[0-9A-Za-z]{%d}_[0-9A-Za-z]" % PUBLIC_ID_LENGTH)
# Bidirectional overrides can make an audit line read differently from what
# it stores ("trojan source"); they have no place in names or reasons.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

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
EXIT_HANGUP = 129  # 128 + the signal's number, as shells report it
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
EXIT_TERMINATED = 143

EXIT_KINDS = {
    EXIT_INTERNAL: "internal",
    EXIT_USAGE: "usage",
    EXIT_NOT_FOUND: "not_found",
    EXIT_FORBIDDEN: "forbidden",
    EXIT_CONFLICT: "conflict",
    EXIT_DATABASE: "database",
    EXIT_UNDELIVERED: "undelivered",
    EXIT_EXPIRING: "expiring",
    EXIT_CHAIN_BROKEN: "chain_broken",
    EXIT_HANGUP: "interrupted",
    EXIT_INTERRUPTED: "interrupted",
    EXIT_BROKEN_PIPE: "broken_pipe",
    EXIT_TERMINATED: "interrupted",
}

EXIT_CODES_HELP = """\
exit codes:
  0  success, including "nothing to change"
  1  unexpected internal error (one line; --debug shows the traceback)
  2  usage or validation error (nothing was sent to the database)
  3  workspace or identity not found
  4  actor not allowed (not a Kan user, not an active member, or lacks
     workspace:manage)
  5  conflict or invalid state (slug taken, identity revoked, ...)
  6  database unreachable, or the agent tables are missing (apply
     `agent-identity schema`); doctor: a check failed
  7  verify: the token is not valid (the output says why)
  8  the output or the token file could not be written; after a change, stderr
     says it was committed and what to do (rotate for a token)
  9  expiring: live tokens expire within the window
  10 audit verify: an audit chain is broken, or no longer extends the pinned
     head (the output says where and how)
  129, 130, 143  hangup, Ctrl-C, terminated; a transaction not yet committed was
     rolled back (after a commit, stderr says so)
  141 the reader of stdout went away (a closed pipe); verify keeps its 0 or 7"""


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


@contextlib.contextmanager
def signals_as_interrupts():
    """While a command runs, SIGTERM and SIGHUP end it the way Ctrl-C does."""
    import signal

    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            previous[signum] = signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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

    def __init__(self, message: str, *, workspace_id: int, actor_id, condition: str,
                 token_public_id: str | None = None):
        super().__init__(EXIT_FORBIDDEN, message)
        self.workspace_id = workspace_id
        self.actor_id = actor_id
        self.condition = condition
        self.token_public_id = token_public_id


# --- Pure helpers: validation -----------------------------------------------


def is_invisible(char: str) -> bool:
    """A character that would act on a terminal or read as something else: a control
    character, an unpaired surrogate (an undecodable byte), a bidirectional override."""
    return unicodedata.category(char) in ("Cc", "Cs") or char in BIDI_CONTROLS


def check_text(value: str, *, max_length: int, allow_empty: bool = False) -> str:
    """Refuse text that is too long, empty, or holds control characters."""
    if not allow_empty and not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if len(value) > max_length:
        raise argparse.ArgumentTypeError(f"is {len(value)} characters long; the limit is {max_length}")
    for char in filter(is_invisible, value):
        raise argparse.ArgumentTypeError(f"contains a control character (U+{ord(char):04X})")
    if SECRET_BEARING_RE.search(value):
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
    if SECRET_BEARING_RE.match(value):
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
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
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


# --- Pure helpers: the audit chain -------------------------------------------
#
# What the database's trigger computes in SQL when it writes an event, computed
# again here, from the rows alone, as docs/schema.md ("The audit chain") specifies.

CHAIN_ENCODING = "agent-identity audit v1"
CHAIN_START = "0" * 64  # the previous hash of a workspace's first event
HEAD_RE = re.compile(r"(?P<sequence>[1-9][0-9]{0,18}):(?P<hash>[0-9a-f]{64})")


class Head(collections.namedtuple("Head", "sequence hash")):
    """A chain's head, or a point of it: a sequence number and that event's hash."""

    __slots__ = ()

    def __str__(self) -> str:
        return f"{self.sequence}:{self.hash}"


def parse_head(value: str) -> Head:
    """audit verify --expect-head SEQ:HASH, as audit head printed it."""
    match = HEAD_RE.fullmatch(value.strip().lower()) if value.isascii() else None
    if match is None:
        raise argparse.ArgumentTypeError("must be SEQUENCE:HASH as `agent-identity audit head` prints it "
                                         "(a number, a colon, 64 hexadecimal digits)")
    return Head(int(match["sequence"]), match["hash"])


def chain_field(value: str | None) -> bytes:
    """One field of the encoding: its UTF-8 length in bytes, ':', the bytes, ','; NULL is '-,'."""
    if value is None:
        return b"-,"
    data = value.encode("utf-8")
    return b"%d:%s," % (len(data), data)


def chain_hash(previous_hash: str, event: dict) -> str:
    """SHA-256, as hex, of the previous event's hash (32 bytes) followed by this event's encoding."""
    import hashlib

    fields = (
        CHAIN_ENCODING,
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
        event["createdAt"].strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    )
    return hashlib.sha256(bytes.fromhex(previous_hash) + b"".join(map(chain_field, fields))).hexdigest()


def check_chain(events, expect: Head | None = None) -> dict:
    """Walk a workspace's events in sequence order (an iterable of rows, read as it goes)
    and say whether they form an intact chain: how many were checked, the head, and the
    first break, with its kind:

    gap        a sequence number is missing (an event was deleted)
    changed    an event does not hash to its recorded hash, or (when the next event no
               longer links to it) was rewritten with its hash recomputed
    inserted   an event sits between two that linked to each other
    reordered  events swapped places (their links or times say so)
    unchained  an event has no place in the chain (written past the trigger)
    head_mismatch  with expect: the event at that sequence is not the pinned one, or the
               chain ends before it (later events rewritten, or the end cut off)
    """
    previous_hash, before_previous, expected = CHAIN_START, None, 1
    previous, checked, head = None, 0, None

    def broken(kind: str, sequence: int | None, event: dict | None, message: str) -> dict:
        return {"events": checked, "head": head, "intact": False,
                "break": {"kind": kind, "sequence": sequence, "eventPublicId": event and event["publicId"],
                          "message": message}}

    events = iter(events)
    event = next(events, None)
    while event is not None:
        following = next(events, None)
        sequence = event["sequence"]
        if sequence is None:
            return broken("unchained", None, event, f"event {event['publicId']} has no place in the chain: it was "
                                                    "written past the chain's trigger")
        if sequence > expected:
            missing = str(expected) if sequence == expected + 1 else f"{expected} to {sequence - 1}"
            return broken("gap", expected, event, f"event {missing} is missing: the chain goes from "
                                                  f"{expected - 1} to {sequence}")
        if sequence < expected:
            return broken("inserted", sequence, event, f"two events have sequence {sequence}")
        if event["previousHash"] != previous_hash:
            if event["previousHash"] == before_previous:
                return broken("inserted", sequence - 1, previous,
                              f"event {sequence - 1} was inserted: event {sequence} links to the event before it")
            if following is not None and following["hash"] == event["previousHash"]:
                return broken("reordered", sequence, event,
                              f"events {sequence} and {sequence + 1} swapped places: {sequence} links to {sequence + 1}")
            return broken("changed", sequence - 1, previous,
                          f"event {sequence - 1} was changed and its hash recomputed: event {sequence} links to "
                          "a hash it no longer has")
        if chain_hash(previous_hash, event) != event["hash"]:
            out_of_order = (previous is not None and event["createdAt"] < previous["createdAt"]) or \
                (following is not None and following["sequence"] is not None
                 and event["createdAt"] > following["createdAt"])
            if out_of_order:
                return broken("reordered", sequence, event,
                              f"event {sequence} is out of order: its time does not fall between its neighbours'")
            return broken("changed", sequence, event, f"event {sequence} was changed: it no longer hashes to "
                                                      "its recorded hash")
        if expect is not None and sequence == expect.sequence and event["hash"] != expect.hash:
            return broken("head_mismatch", sequence, event,
                          f"event {sequence} is not the one pinned ({expect}): the chain was rewritten from there "
                          "or before")
        before_previous, previous_hash, previous = previous_hash, event["hash"], event
        checked, expected, head = checked + 1, expected + 1, str(Head(sequence, event["hash"]))
        event = following
    if expect is not None and expect.sequence >= expected:
        return broken("head_mismatch", expect.sequence, None,
                      f"the chain ends at {expected - 1}, before the pinned head {expect}: events were removed "
                      "from its end")
    return {"events": checked, "head": head, "intact": True, "break": None}


# --- Pure helpers: configuration and output values --------------------------


def database_url(args: argparse.Namespace) -> str:
    """--database-url, else DATABASE_URL, else POSTGRES_URL, else libpq's defaults."""
    for value in (args.database_url, os.environ.get("DATABASE_URL"), os.environ.get("POSTGRES_URL")):
        if value:
            return value
    return ""


def actor_email(args: argparse.Namespace) -> str:
    """--admin-user-email, else AGENT_IDENTITY_ADMIN_EMAIL; required for database commands."""
    value = args.admin_user_email or os.environ.get("AGENT_IDENTITY_ADMIN_EMAIL")
    if not value:
        raise AdminError(EXIT_USAGE, "say who you are: --admin-user-email or AGENT_IDENTITY_ADMIN_EMAIL")
    try:
        return parse_email(value)
    except argparse.ArgumentTypeError as exc:
        raise AdminError(EXIT_USAGE, f"admin user email {exc}") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libpq's run to several), or ''."""
    return (str(exc).strip().splitlines() or [""])[0]


def redact(text: str, secret: str | None) -> str:
    """Remove a secret (the database password) from a message."""
    return text.replace(secret, "***") if secret else text


def scrub_tokens(message: str) -> str:
    """Blank out token-shaped text, and say why it matters. kan_agent_<12-character id>
    alone is how a token is named without its secret: left as it is."""
    def blank(match: re.Match) -> str:
        return match[0] if PUBLIC_ID_RE.fullmatch(match[0][len(TOKEN_PREFIX):]) else TOKEN_PREFIX + "***"

    scrubbed = TOKEN_LIKE_RE.sub(blank, message)
    if scrubbed == message:
        return message
    return scrubbed + " (a token on the command line lands in shell history and the process list: rotate it)"


def visible(text: str) -> str:
    """Text safe to put on a terminal: control characters (escape sequences, OSC 8
    links, carriage returns), bidirectional overrides and unpaired surrogates
    (undecodable bytes) shown as escapes instead of acted on."""
    def escape(char: str) -> str:
        if char == "\n" or not is_invisible(char):
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

SCHEMA_SQL = """\
-- agent-identity schema {version}: the three tables the agent identity tool and
-- the Kan server share, in schema {schema}, beside Kan's own tables. Idempotent:
-- safe to run more than once. Apply as the owner of Kan's tables (the role Kan's
-- migrations run as; it adds an index to Kan's workspace_members):
--   agent-identity schema | psql --single-transaction -v ON_ERROR_STOP=1 "$POSTGRES_URL"

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
-- audit --token: a token's events, newest first.
CREATE INDEX IF NOT EXISTS "agent_audit_event_token_created_idx"
    ON {schema}.agent_audit_event ("agentTokenId", "createdAt" DESC, "id" DESC);

-- On Kan's own workspace_members, which has no index on these columns: the
-- access check finds the actor's memberships in a workspace through it, so
-- it stays an index lookup however many members Kan has. Additive only.
CREATE INDEX IF NOT EXISTS "agent_identity_workspace_members_user_idx"
    ON {schema}.workspace_members ("userId", "workspaceId");

-- What ends stays ended, for every role, the owner included: a revoked token is
-- never un-revoked and its expiry only moves earlier; a revoked identity stays
-- revoked. The tool never does otherwise; these make a role that may revoke
-- unable to undo it (docs/security.md).
CREATE OR REPLACE FUNCTION {schema}.agent_token_only_ends() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD."revokedAt" IS NOT NULL AND NEW."revokedAt" IS DISTINCT FROM OLD."revokedAt" THEN
        RAISE EXCEPTION 'token % is revoked, and revocation is final', OLD."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    IF OLD."expiresAt" IS NOT NULL AND (NEW."expiresAt" IS NULL OR NEW."expiresAt" > OLD."expiresAt") THEN
        RAISE EXCEPTION 'token % may not live longer than it was issued to', OLD."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER agent_token_only_ends
    BEFORE UPDATE ON {schema}.agent_token
    FOR EACH ROW EXECUTE FUNCTION {schema}.agent_token_only_ends();

CREATE OR REPLACE FUNCTION {schema}.agent_identity_revocation_is_final() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'revoked' AND (NEW.status <> 'revoked' OR NEW."revokedAt" IS DISTINCT FROM OLD."revokedAt") THEN
        RAISE EXCEPTION 'agent identity % is revoked, and revocation is final', OLD."publicId"
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER agent_identity_revocation_is_final
    BEFORE UPDATE ON {schema}.agent_identity
    FOR EACH ROW EXECUTE FUNCTION {schema}.agent_identity_revocation_is_final();

-- The audit chain (docs/schema.md, "The audit chain"). Each event gets its
-- workspace's next sequence number, the hash of the event before it, and its own
-- hash: SHA-256 of that previous hash and an encoding of what the event means, by
-- values no cascade changes (the public ids and names of what it is about, kept in
-- columns of its own). A trigger writes them, in the statement and transaction that
-- write the event, whoever writes it; writers of one workspace take turns (a
-- transaction-level advisory lock keyed by the workspace), other workspaces never wait.
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

-- One field of the encoding: its length in UTF-8 bytes, ':', its text, ','; NULL is '-,'.
CREATE OR REPLACE FUNCTION {schema}.agent_audit_field(value text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value IS NULL THEN '-,'
                ELSE octet_length(convert_to(value, 'UTF8')) || ':' || value || ',' END
$$;

-- An event's hash, as hex: SHA-256 of the previous hash's 32 bytes, then the encoding.
CREATE OR REPLACE FUNCTION {schema}.agent_audit_event_hash(e {schema}.agent_audit_event) RETURNS varchar
LANGUAGE sql STABLE AS $$
    SELECT encode(sha256(decode(e."previousHash", 'hex') || convert_to(
        {schema}.agent_audit_field('agent-identity audit v1')
        || {schema}.agent_audit_field(e."sequence"::text)
        || {schema}.agent_audit_field(e."workspacePublicId")
        || {schema}.agent_audit_field(e."publicId")
        || {schema}.agent_audit_field(e.action)
        || {schema}.agent_audit_field(e."identityPublicId")
        || {schema}.agent_audit_field(e."identitySlug")
        || {schema}.agent_audit_field(e."tokenPublicId")
        || {schema}.agent_audit_field(e."actorUserUuid"::text)
        || {schema}.agent_audit_field(e."actorEmail")
        || {schema}.agent_audit_field(e.reason)
        || {schema}.agent_audit_field(e.metadata::text)
        || {schema}.agent_audit_field(to_char(e."createdAt", 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
        'UTF8')), 'hex')
$$;

-- A workspace's chain head: its event with the highest sequence, through the unique
-- index (a SQL function PostgreSQL inlines, so its plan shows in the caller's).
CREATE OR REPLACE FUNCTION {schema}.agent_audit_chain_head(workspace_id bigint)
RETURNS TABLE ("sequence" bigint, "hash" varchar, "createdAt" timestamp)
LANGUAGE sql STABLE AS $$
    SELECT h."sequence", h."hash", h."createdAt"
    FROM {schema}.agent_audit_event h
    WHERE h."workspaceId" = workspace_id AND h."sequence" IS NOT NULL
    ORDER BY h."sequence" DESC
    LIMIT 1
$$;

-- An event made the link after (after_sequence, after_hash) of its workspace's chain:
-- the names of what it is about, its sequence number and its hashes.
CREATE OR REPLACE FUNCTION {schema}.agent_audit_event_link(
    e {schema}.agent_audit_event, after_sequence bigint, after_hash varchar)
RETURNS {schema}.agent_audit_event
LANGUAGE plpgsql AS $$
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
END $$;

-- Events written before the chain existed join it when schema is applied, in the
-- order they were written (time, then id), in each workspace whose chain has not
-- begun: an upgrade. Applying schema again finds none. An unchained event in a
-- chained workspace is left alone, for audit verify to report: only a writer that
-- bypassed the trigger below leaves one.
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

CREATE OR REPLACE FUNCTION {schema}.agent_audit_event_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    head record;
BEGIN
    -- This workspace's writers take turns from here to the end of the transaction;
    -- the next reads this event as its head (each query here sees what committed
    -- before it ran).
    PERFORM pg_advisory_xact_lock(hashtext('agent_audit_event chain'), (NEW."workspaceId" % 2147483647)::integer);
    SELECT * INTO head FROM {schema}.agent_audit_chain_head(NEW."workspaceId");
    -- Never earlier than the event before it (a transaction that began first but wrote
    -- second): times never run backwards along a chain.
    NEW."createdAt" := GREATEST(NEW."createdAt", head."createdAt");
    RETURN {schema}.agent_audit_event_link(NEW, coalesce(head."sequence", 0), coalesce(head."hash", repeat('0', 64)));
END $$;
CREATE OR REPLACE TRIGGER agent_audit_event_chain
    BEFORE INSERT ON {schema}.agent_audit_event
    FOR EACH ROW EXECUTE FUNCTION {schema}.agent_audit_event_chain();

-- Append-only, for every role, the owner included. What may still happen: Kan
-- hard-deleting a workspace deletes its events; a deleted identity, token or user
-- leaves NULL in the event's foreign key (the chain keeps their ids in columns of its
-- own); and the backfill above chains an event written before the chain, once. A
-- superuser can disable these triggers: audit verify is what catches that.
CREATE OR REPLACE FUNCTION {schema}.agent_audit_event_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
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
       AND (NEW."agentIdentityId" IS NULL OR NEW."agentIdentityId" = OLD."agentIdentityId")
       AND (NEW."agentTokenId" IS NULL OR NEW."agentTokenId" = OLD."agentTokenId")
       AND (NEW."actorUserId" IS NULL OR NEW."actorUserId" = OLD."actorUserId") THEN
        RETURN NEW;
    END IF;
    IF OLD."sequence" IS NULL AND to_jsonb(NEW) - chain = to_jsonb(OLD) - chain THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'agent_audit_event is append-only: audit event % may not be changed', OLD."publicId"
        USING ERRCODE = 'check_violation';
END $$;
CREATE OR REPLACE TRIGGER agent_audit_event_append_only
    BEFORE UPDATE OR DELETE ON {schema}.agent_audit_event
    FOR EACH ROW EXECUTE FUNCTION {schema}.agent_audit_event_append_only();

CREATE OR REPLACE FUNCTION {schema}.agent_audit_event_no_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'agent_audit_event is append-only: it may not be truncated' USING ERRCODE = 'check_violation';
END $$;
CREATE OR REPLACE TRIGGER agent_audit_event_no_truncate
    BEFORE TRUNCATE ON {schema}.agent_audit_event
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.agent_audit_event_no_truncate();

-- Like Kan's own tables: row level security on, no policies. The table owner
-- (the role migrations run as) is not subject to it.
ALTER TABLE {schema}.agent_identity ENABLE ROW LEVEL SECURITY;
ALTER TABLE {schema}.agent_token ENABLE ROW LEVEL SECURITY;
ALTER TABLE {schema}.agent_audit_event ENABLE ROW LEVEL SECURITY;
"""


def schema_sql(db_schema: str = DB_SCHEMA_DEFAULT) -> str:
    """The DDL, every object qualified with the schema that holds Kan's tables."""
    return SCHEMA_SQL.format(version=__version__, schema=quote_identifier(db_schema))


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
    },
    "agent_audit_event": {
        "id": "bigint", "publicId": "character varying(12)", "workspaceId": "bigint",
        "agentIdentityId": "bigint", "agentTokenId": "bigint", "action": "character varying(64)",
        "actorUserId": "uuid", "actorEmail": "character varying(255)", "reason": "text",
        "metadata": "jsonb", "createdAt": "timestamp without time zone",
        "sequence": "bigint", "workspacePublicId": "character varying(12)",
        "identityPublicId": "character varying(12)", "identitySlug": "character varying(64)",
        "tokenPublicId": "character varying(12)", "actorUserUuid": "uuid",
        "previousHash": "character varying(64)", "hash": "character varying(64)",
    },
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
    password = params.get("password") or os.environ.get("PGPASSWORD")
    params["application_name"] = APPLICATION_NAME
    params.setdefault("connect_timeout", os.environ.get("PGCONNECT_TIMEOUT") or CONNECT_TIMEOUT_DEFAULT)
    try:
        return psycopg.connect(**params, autocommit=True, prepare_threshold=None)
    except psycopg.Error as exc:
        detail = first_line(exc) or type(exc).__name__
        raise AdminError(
            EXIT_DATABASE,
            redact(f"cannot connect to {describe_target(connection_target(params))}: {detail}", password),
        ) from None


def target_of(conn) -> dict:
    """Where an open connection writes: what the server says, not what was asked for."""
    info = conn.info
    return {"host": info.host, "port": str(info.port), "database": info.dbname, "role": info.user}


@contextlib.contextmanager
def transaction(conn, lock_timeout: float, *, read_only: bool = False):
    """One transaction under the tool's limits, whatever sits between the tool and the server.

    BEGIN and a SET LOCAL of each limit travel as one message, so they cost
    the one round trip a bare BEGIN costs. SET LOCAL lasts exactly as long as
    the transaction: a transaction-mode pooler that hands the server
    connection to another client afterwards hands it over clean, and every
    statement of the transaction, its first one's parsing included, runs
    under the limits. SET takes no query parameters: the values are the
    tool's own numbers, quoted by psycopg.sql.Literal.
    """
    import psycopg
    from psycopg import sql

    settings = [sql.SQL("SET LOCAL {} = {}").format(sql.SQL(name), sql.Literal(value))
                for name, value in session_limits(lock_timeout).items()]
    conn.execute(sql.SQL("; ").join([sql.SQL("BEGIN READ ONLY" if read_only else "BEGIN"), *settings]))
    try:
        yield
    except BaseException:
        if not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except psycopg.OperationalError as exc:
        if read_only:
            raise
        # The COMMIT went out and its answer never came back: it may have been made.
        raise AdminError(
            EXIT_DATABASE,
            f"lost the database connection while committing ({first_line(exc) or type(exc).__name__}): "
            "the change may or may not have been made; check with inspect before trying again",
        ) from None


def database_error(exc: Exception, lock_timeout: float, target: dict) -> AdminError:
    """Translate a psycopg error met while running a command against target."""
    from psycopg import errors

    if isinstance(exc, errors.LockNotAvailable):
        return AdminError(
            EXIT_CONFLICT,
            f"the identity is busy: another session is changing it (waited {lock_timeout:g} s for its lock); "
            "nothing was written: try again, or wait longer with --lock-timeout",
        )
    if isinstance(exc, errors.QueryCanceled):
        return AdminError(
            EXIT_DATABASE,
            f"the database did not answer within {statement_timeout_ms(lock_timeout) / 1000:g} s; nothing was written",
        )
    if isinstance(exc, (errors.UndefinedTable, errors.UndefinedObject, errors.UndefinedColumn)):
        missing = exc.diag.message_primary or str(exc)
        if "agent_" in missing:
            return AdminError(
                EXIT_DATABASE,
                f"the agent tables are missing or out of date in {describe_target(target)} ({missing}): "
                "run `agent-identity doctor` to see where Kan's tables are, then apply "
                "`agent-identity schema` there as their owner",
            )
        return AdminError(EXIT_DATABASE, f"{describe_target(target)} does not look like a Kan database ({missing})")
    sqlstate = exc.sqlstate
    # No SQLSTATE: the client lost the server; 08: connection exceptions; 57P: the server shut down.
    if isinstance(exc, errors.OperationalError) and (sqlstate is None or sqlstate.startswith(("08", "57P"))):
        return AdminError(
            EXIT_DATABASE, f"lost the database connection: {first_line(exc) or type(exc).__name__}; nothing was written"
        )
    return AdminError(EXIT_INTERNAL, f"unexpected database error {sqlstate}: {exc.diag.message_primary}")


# The check that precedes every workspace command, in one query: does the
# workspace exist, is the actor a Kan user, an active member, and a manager by
# Kan's rule (a member override decides; else the custom role's grant; else
# the legacy role, of which only admin manages) on one of their active
# memberships, with no override on any of them denying it. The identity is read, and
# locked for a mutation, only when the actor passes.
# Kan's rule, as CTEs that the access check (one workspace) and the commands
# across workspaces (workspaces, expiring) share: the actor; their active
# memberships ({scope} narrows them to one workspace); the workspaces where an
# override denies the permission on any of them, which wins over every other
# membership (as an explicit Deny wins in AWS IAM); and the workspaces they manage.
MANAGER_CTES = """
actor AS (
    SELECT "id", email
    FROM "user"
    WHERE lower(email) = lower(%(email)s)
    ORDER BY email = %(email)s DESC
    LIMIT 1
),
membership AS (
    SELECT m."id", m."roleId", m.role, m."workspaceId"
    FROM workspace_members m
    JOIN actor ON m."userId" = actor."id"
    WHERE m.status = 'active' AND m."deletedAt" IS NULL {scope}
),
denied AS (
    SELECT membership."workspaceId"
    FROM membership
    JOIN workspace_member_permissions override
        ON override."workspaceMemberId" = membership."id" AND override.permission = %(permission)s
    WHERE NOT override.granted
),
manager AS (
    SELECT DISTINCT membership."workspaceId"
    FROM membership
    LEFT JOIN workspace_member_permissions override
        ON override."workspaceMemberId" = membership."id" AND override.permission = %(permission)s
    WHERE membership."workspaceId" NOT IN (SELECT "workspaceId" FROM denied) AND CASE
        WHEN override."workspaceMemberId" IS NOT NULL THEN override.granted
        WHEN membership."roleId" IS NOT NULL THEN EXISTS (
            SELECT 1
            FROM workspace_roles r
            JOIN workspace_role_permissions grant_ ON grant_."workspaceRoleId" = r."id"
            WHERE r."id" = membership."roleId"
              AND r."workspaceId" = membership."workspaceId"
              AND grant_.permission = %(permission)s
              AND grant_.granted)
        ELSE membership.role = 'admin'
    END
)"""

ACCESS_SQL = """
WITH ws AS (
    SELECT "id", "publicId", "deletedAt" IS NOT NULL AS deleted
    FROM workspace
    WHERE {workspace}
),""" + MANAGER_CTES.replace("{scope}", 'AND m."workspaceId" = (SELECT "id" FROM ws)') + """,
target AS (
    SELECT i."id", i."publicId", i.slug, i."displayName", i.status::text AS status,
           i."createdAt", i."updatedAt", i."pausedAt", i."revokedAt", i.xmin::text AS version
    FROM agent_identity i
    WHERE i."workspaceId" = (SELECT "id" FROM ws WHERE NOT deleted)
      AND {identity}
      AND EXISTS (SELECT 1 FROM manager)
    {lock}
)
SELECT timezone('utc', now()) AS now,
       ws."id" AS workspace_id,
       ws."publicId" AS workspace_public_id,
       ws.deleted AS workspace_deleted,
       actor."id" AS actor_id,
       actor.email AS actor_email,
       EXISTS (SELECT 1 FROM membership) AS is_member,
       EXISTS (SELECT 1 FROM manager) AS is_manager,
       to_jsonb(target) AS identity,
       {tokens} AS tokens,
       CASE WHEN EXISTS (SELECT 1 FROM manager) THEN {detail} END AS detail,
       (SELECT i.xmin::text FROM agent_identity i WHERE i."id" = target."id") AS seen_version
FROM (SELECT) AS one
LEFT JOIN ws ON true
LEFT JOIN actor ON true
LEFT JOIN target ON true
"""

# An identity's tokens, newest first, never their hashes, as one JSON array.
# The access query reads them in the same statement as its lock (for the
# commands that need them); if it had to wait for that lock, its snapshot is
# older than the lock and they are read again (see check_access).
TOKENS_SQL = """(
    SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY t."id" DESC), '[]'::jsonb)
    FROM (
        SELECT t."id", t."publicId", t.name, t.scopes, t."createdAt", t."expiresAt", t."lastUsedAt",
               t."revokedAt", source."publicId" AS "rotatedFromPublicId",
               -- the lifetime it was issued with, as its issuing event recorded it
               (SELECT e.metadata->>'expiresIn'
                FROM agent_audit_event e
                WHERE e."agentIdentityId" = t."agentIdentityId" AND e."agentTokenId" = t."id"
                  AND e.action IN ('identity.created', 'identity.token_rotated')
                ORDER BY e."id" LIMIT 1) AS "issuedFor"
        FROM agent_token t
        LEFT JOIN agent_token source ON source."id" = t."rotatedFromId"
        WHERE t."agentIdentityId" = {identity}
    ) AS t
)"""

# What a read asks for beside the access check, in the same statement; each
# is computed only for an actor who passes it (ACCESS_SQL's {detail}).
# inspect: the identity's latest audit events, newest first.
EVENTS_DETAIL = """(
    SELECT coalesce(jsonb_agg(to_jsonb(e) ORDER BY e."createdAt" DESC, e."id" DESC), '[]'::jsonb)
    FROM (
        SELECT e."id", e."publicId", e.action, e."actorEmail", e.reason, e.metadata, e."createdAt",
               t."publicId" AS "tokenPublicId"
        FROM agent_audit_event e
        LEFT JOIN agent_token t ON t."id" = e."agentTokenId"
        WHERE e."agentIdentityId" = (SELECT "id" FROM target)
        ORDER BY e."createdAt" DESC, e."id" DESC
        LIMIT %(events)s
    ) AS e
)"""

# Live tokens of identities not revoked that expire within %(within)s, soonest
# first, in the workspaces the actor manages (in the access check, the one
# workspace checked): for expiring, and for list's warnings about the whole
# workspace, not only the page shown.
EXPIRING_TOKENS = """(
    SELECT coalesce(jsonb_agg(to_jsonb(x) ORDER BY x."expiresAt", x."id"), '[]'::jsonb)
    FROM (
        SELECT t."id", t."publicId", t.name, t."expiresAt", i.slug, i."publicId" AS "identityPublicId",
               w."publicId" AS "workspacePublicId", w.slug AS "workspaceSlug"
        FROM manager
        JOIN workspace w ON w."id" = manager."workspaceId" AND w."deletedAt" IS NULL
        JOIN agent_identity i ON i."workspaceId" = w."id" AND i.status <> 'revoked'
        JOIN agent_token t ON t."agentIdentityId" = i."id"
        WHERE t."revokedAt" IS NULL
          AND t."expiresAt" > timezone('utc', now())
          AND t."expiresAt" <= timezone('utc', now()) + %(within)s
    ) AS x
)"""

# list: one page of the workspace's identities, newest first, starting just
# after the identity named by --after (and whether that one exists).
LIST_DETAIL = """(
    WITH after AS (
        SELECT "createdAt", "id"
        FROM agent_identity
        WHERE "workspaceId" = (SELECT "id" FROM ws) AND "publicId" = %(after)s
    ),
    page AS (
        SELECT i."id", i."publicId", i.slug, i."displayName", i.status::text AS status,
               i."createdAt", i."updatedAt", i."pausedAt", i."revokedAt",
               tokens."liveTokens", tokens."nextExpiresAt", tokens."lastUsedAt"
        FROM agent_identity i
        CROSS JOIN LATERAL (
            SELECT count(*) FILTER (WHERE t.live) AS "liveTokens",
                   min(t."expiresAt") FILTER (WHERE t.live) AS "nextExpiresAt",
                   max(t."lastUsedAt") AS "lastUsedAt"
            FROM (
                SELECT "expiresAt", "lastUsedAt",
                       "revokedAt" IS NULL AND ("expiresAt" IS NULL OR "expiresAt" > timezone('utc', now())) AS live
                FROM agent_token
                WHERE "agentIdentityId" = i."id"
            ) AS t
        ) AS tokens
        WHERE i."workspaceId" = (SELECT "id" FROM ws)
          AND (%(status)s::agent_identity_status IS NULL OR i.status = %(status)s::agent_identity_status)
          AND (%(after)s::text IS NULL
               OR (i."createdAt", i."id") < ((SELECT "createdAt" FROM after), (SELECT "id" FROM after)))
        ORDER BY i."createdAt" DESC, i."id" DESC
        LIMIT %(limit)s
    )
    SELECT jsonb_build_object(
        'expiring', {expiring},
        'cursorFound', %(after)s::text IS NULL OR EXISTS (SELECT 1 FROM after),
        'identities', coalesce((SELECT jsonb_agg(to_jsonb(page) ORDER BY page."createdAt" DESC, page."id" DESC)
                                FROM page), '[]'::jsonb))
)""".replace("{expiring}", EXPIRING_TOKENS)

# Every mutation is one statement. Its own CTEs end in `identity_after` (the
# identity row as the change leaves it) and `subject` (the identity and token
# the event is about); AUDIT_INSERT then writes the audit event and returns
# the identity, so the change and its audit row cannot part.
AUDIT_INSERT = """,
audit AS (
    INSERT INTO agent_audit_event
        ("publicId", "workspaceId", "agentIdentityId", "agentTokenId", action,
         "actorUserId", "actorEmail", reason, metadata)
    SELECT %(audit_public_id)s, %(workspace_id)s, subject.identity_id, subject.token_id, %(action)s,
           %(actor_id)s, %(actor_email)s, %(reason)s, %(metadata)s
    FROM subject
    RETURNING "id"
)
SELECT to_jsonb(identity_after) FROM identity_after, audit
"""

CREATE_SQL = """
WITH identity_after AS (
    INSERT INTO agent_identity ("publicId", "workspaceId", slug, "displayName", status, "createdBy")
    VALUES (%(identity_public_id)s, %(workspace_id)s, %(slug)s, %(display_name)s, 'active', %(actor_id)s)
    RETURNING *
),
new_token AS (
    INSERT INTO agent_token ("publicId", "agentIdentityId", name, "tokenHash", scopes, "expiresAt", "createdBy")
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
    UPDATE agent_token
    SET "revokedAt" = timezone('utc', now()), "revokedBy" = %(actor_id)s
    WHERE "id" = ANY(%(revoke_token_ids)s) AND "agentIdentityId" = ANY(%(identity_ids)s) AND "revokedAt" IS NULL
)"""

# A change to an identity's tokens stamps the identity's updatedAt.
TOUCH_IDENTITY = """,
identity_after AS (
    UPDATE agent_identity SET "updatedAt" = timezone('utc', now()) WHERE "id" = %(identity_id)s
    RETURNING *
)"""

# A rotation with a grace window shortens the old live tokens' lives instead
# of revoking them (LEAST ignores a NULL "expiresAt").
ROTATE_SQL = RETIRE_TOKENS + TOUCH_IDENTITY + """,
graced AS (
    UPDATE agent_token
    SET "expiresAt" = LEAST("expiresAt", %(grace_until)s)
    WHERE "id" = ANY(%(grace_token_ids)s) AND "agentIdentityId" = %(identity_id)s AND "revokedAt" IS NULL
),
new_token AS (
    INSERT INTO agent_token
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
    UPDATE agent_identity
    SET status = %(status)s::agent_identity_status,
        "updatedAt" = timezone('utc', now()),
        "pausedAt" = CASE %(status)s::agent_identity_status
            WHEN 'paused' THEN timezone('utc', now())
            WHEN 'active' THEN NULL
            ELSE "pausedAt" END,
        "revokedAt" = CASE %(status)s::agent_identity_status
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


# pause, resume and revoke --all: every identity of the workspace the move
# applies to, in id order, locked (so two bulk runs take their locks in the
# same order and cannot deadlock), with its tokens not yet revoked.
BULK_DETAIL = """(
    SELECT coalesce(jsonb_agg(to_jsonb(x) ORDER BY x."id"), '[]'::jsonb)
    FROM (
        SELECT i."id", i."publicId", i.slug, i.status::text AS status,
               (SELECT coalesce(jsonb_agg(jsonb_build_object('id', t."id", 'publicId', t."publicId")
                                          ORDER BY t."id"), '[]'::jsonb)
                FROM agent_token t
                WHERE t."agentIdentityId" = i."id" AND t."revokedAt" IS NULL) AS tokens
        FROM agent_identity i
        WHERE i."workspaceId" = (SELECT "id" FROM ws WHERE NOT deleted)
          AND i.status::text = ANY(%(from_statuses)s)
        ORDER BY i."id"
        FOR UPDATE OF i
    ) AS x
)"""

# ... then the move of them all, their tokens retired (revoke), and one audit
# event each, in one statement.
BULK_SQL = RETIRE_TOKENS + """,
moved AS (""" + SET_STATUS + """
    WHERE "id" = ANY(%(identity_ids)s)
    RETURNING "id"
),
audit AS (
    INSERT INTO agent_audit_event
        ("publicId", "workspaceId", "agentIdentityId", action, "actorUserId", "actorEmail", reason, metadata)
    SELECT e."publicId", %(workspace_id)s, e."identityId", %(action)s, %(actor_id)s, %(actor_email)s,
           %(reason)s, e.metadata
    FROM jsonb_to_recordset(%(events)s) AS e("publicId" text, "identityId" bigint, metadata jsonb)
    RETURNING "id"
)
SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM audit)
"""

# A refused attempt, recorded in a transaction of its own after the
# command's has rolled back: what was tried, by whom, and which condition failed.
ACCESS_DENIED_SQL = """
INSERT INTO agent_audit_event
    ("publicId", "workspaceId", "agentIdentityId", "agentTokenId", action,
     "actorUserId", "actorEmail", reason, metadata)
SELECT %(audit_public_id)s, %(workspace_id)s,
       (SELECT i."id" FROM agent_identity i WHERE i."workspaceId" = %(workspace_id)s AND i.slug = %(slug)s),
       (SELECT t."id" FROM agent_token t JOIN agent_identity i ON i."id" = t."agentIdentityId"
        WHERE i."workspaceId" = %(workspace_id)s AND t."publicId" = %(token_public_id)s),
       'access.denied', %(actor_id)s, %(actor_email)s, %(reason)s, %(metadata)s
"""

REVOKE_TOKEN_SQL = RETIRE_TOKENS + TOUCH_IDENTITY + """,
subject AS (
    SELECT %(identity_id)s::bigint AS identity_id, %(token_id)s::bigint AS token_id
)""" + AUDIT_INSERT

EXPIRING_SQL = "WITH" + MANAGER_CTES.replace("{scope}", "") + "\nSELECT " + EXPIRING_TOKENS

# The workspaces the actor may manage, by the access check's own rule, with
# what each holds.
WORKSPACES_SQL = "WITH" + MANAGER_CTES.replace("{scope}", "") + """
SELECT w."publicId", w.slug, w.name,
       identities.active, identities.paused, identities.revoked,
       tokens.live AS "liveTokens", tokens.next AS "nextExpiresAt"
FROM manager
JOIN workspace w ON w."id" = manager."workspaceId" AND w."deletedAt" IS NULL
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE i.status = 'active') AS active,
           count(*) FILTER (WHERE i.status = 'paused') AS paused,
           count(*) FILTER (WHERE i.status = 'revoked') AS revoked
    FROM agent_identity i
    WHERE i."workspaceId" = w."id"
) AS identities
CROSS JOIN LATERAL (
    SELECT count(*) AS live, min(t."expiresAt") AS next
    FROM agent_identity i
    JOIN agent_token t ON t."agentIdentityId" = i."id"
    WHERE i."workspaceId" = w."id" AND i.status <> 'revoked' AND t."revokedAt" IS NULL
      AND (t."expiresAt" IS NULL OR t."expiresAt" > timezone('utc', now()))
) AS tokens
ORDER BY w.slug, w."publicId"
"""


def managed_names(conn, email: str) -> list[str]:
    """The slugs and public ids of the workspaces the actor may manage (for "did you mean")."""
    rows = conn.execute(WORKSPACES_SQL, {"email": email, "permission": MANAGE_PERMISSION}).fetchall()
    return [name for row in rows for name in row[:2] if name]


# verify: the token, with its identity, in the workspace the check found
# (ACCESS_SQL's ws is the token's own workspace unless --workspace-public-id
# names one); expiry is judged by the database's clock, as a server should.
VERIFY_DETAIL = """(
    SELECT to_jsonb(v)
    FROM (
        SELECT t."publicId", t."tokenHash", t.scopes, t."expiresAt", t."revokedAt",
               t."expiresAt" IS NOT NULL AND t."expiresAt" <= timezone('utc', now()) AS expired,
               to_jsonb(i) AS identity
        FROM agent_token t
        JOIN agent_identity i ON i."id" = t."agentIdentityId"
        WHERE t."publicId" = %(token_public_id)s AND i."workspaceId" = (SELECT "id" FROM ws)
    ) AS v
)"""

# audit: one page of the workspace's events, newest first, starting just after
# the event named by --after (and whether that one exists), within the window
# and filters given. The columns are UTC timestamps; the window's bounds are
# computed from the transaction's clock in UTC, whatever the server's TimeZone.
# Each filter is either absent (NULL: the planner drops it) or narrows the scan;
# --slug and --token read their own indexes.
AUDIT_DETAIL = """(
    WITH after AS (
        SELECT "createdAt", "id"
        FROM agent_audit_event
        WHERE "workspaceId" = (SELECT "id" FROM ws) AND "publicId" = %(after)s
    ),
    page AS (
        SELECT e."id", e."publicId", e."createdAt", e.action, e."actorEmail", e.reason, e.metadata,
               i."publicId" AS "identityPublicId", i.slug, t."publicId" AS "tokenPublicId", e."sequence", e."hash"
        FROM agent_audit_event e
        LEFT JOIN agent_identity i ON i."id" = e."agentIdentityId"
        LEFT JOIN agent_token t ON t."id" = e."agentTokenId"
        WHERE e."workspaceId" = (SELECT "id" FROM ws)
          AND e."createdAt" >= coalesce(%(since_at)s::timestamp,
                                        timezone('utc', now()) - %(since_ago)s::interval, '-infinity')
          AND e."createdAt" < coalesce(%(until_at)s::timestamp,
                                       timezone('utc', now()) - %(until_ago)s::interval, 'infinity')
          AND (%(slug)s::text IS NULL OR e."agentIdentityId" = (SELECT "id" FROM target))
          AND (%(token_filter)s::text IS NULL OR e."agentTokenId" = (
                SELECT t."id" FROM agent_token t WHERE t."publicId" = %(token_filter)s))
          AND (%(actor)s::text IS NULL OR lower(e."actorEmail") = lower(%(actor)s))
          AND (%(actions)s::text[] IS NULL OR e.action = ANY(%(actions)s))
          AND (%(after)s::text IS NULL
               OR (e."createdAt", e."id") < ((SELECT "createdAt" FROM after), (SELECT "id" FROM after)))
        ORDER BY e."createdAt" DESC, e."id" DESC
        LIMIT %(limit)s
    )
    SELECT jsonb_build_object(
        'cursorFound', %(after)s::text IS NULL OR EXISTS (SELECT 1 FROM after),
        'events', coalesce((SELECT jsonb_agg(to_jsonb(page) ORDER BY page."createdAt" DESC, page."id" DESC)
                            FROM page), '[]'::jsonb))
)"""

# The head of a workspace's audit chain (its highest sequence), and how many of
# its events have no place in the chain; {workspace} is the workspace's id.
CHAIN_HEAD = """(
    SELECT jsonb_build_object(
        'sequence', head."sequence", 'hash', head."hash", 'createdAt', head."createdAt",
        'unchained', (SELECT count(*) FROM agent_audit_event u
                      WHERE u."workspaceId" = {workspace} AND u."sequence" IS NULL))
    FROM (SELECT) AS one
    LEFT JOIN LATERAL agent_audit_chain_head({workspace}) AS head ON true
)"""

# audit head and audit verify without a workspace: every workspace the actor
# manages, with its chain's head.
MANAGED_HEADS_SQL = "WITH" + MANAGER_CTES.replace("{scope}", "") + """
SELECT w."id", w."publicId", w.slug, """ + CHAIN_HEAD.replace("{workspace}", 'w."id"') + """ AS head
FROM manager
JOIN workspace w ON w."id" = manager."workspaceId" AND w."deletedAt" IS NULL
ORDER BY w.slug, w."publicId"
"""

# doctor: every workspace that has audit events, whoever manages it.
AUDITED_WORKSPACES_SQL = """
SELECT w."id", w."publicId", w.slug
FROM workspace w
WHERE EXISTS (SELECT 1 FROM agent_audit_event e WHERE e."workspaceId" = w."id")
ORDER BY w.slug, w."publicId"
"""

# A workspace's events in chain order, with the values the chain's encoding
# covers (the metadata as the jsonb's text): what check_chain reads; then the
# first of its events that has no place in the chain, if one has none.
CHAIN_COLUMNS = """
    "publicId", "sequence", "workspacePublicId", action, "identityPublicId", "identitySlug",
    "tokenPublicId", "actorUserUuid", "actorEmail", reason, metadata::text AS metadata, "createdAt",
    "previousHash", "hash"
"""
CHAIN_EVENTS_SQL = "SELECT" + CHAIN_COLUMNS + """
FROM agent_audit_event
WHERE "workspaceId" = %(workspace_id)s AND "sequence" IS NOT NULL
ORDER BY "sequence"
"""
UNCHAINED_SQL = "SELECT" + CHAIN_COLUMNS + """
FROM agent_audit_event
WHERE "workspaceId" = %(workspace_id)s AND "sequence" IS NULL
ORDER BY "id"
LIMIT 1
"""
CHAIN_FETCH_ROWS = 10_000  # rows per fetch: memory stays flat however long the chain


def chain_events(conn, workspace_id: int):
    """A workspace's events in chain order, fetched a batch at a time from a server-side
    cursor; then its first unchained event, if any."""
    from psycopg.rows import dict_row

    params = {"workspace_id": workspace_id}
    with conn.cursor(name="agent_audit_chain", row_factory=dict_row) as cursor:
        cursor.itersize = CHAIN_FETCH_ROWS
        cursor.execute(CHAIN_EVENTS_SQL, params)
        yield from cursor
    yield from conn.cursor(row_factory=dict_row).execute(UNCHAINED_SQL, params)


# --workspace W: the workspace whose public id or slug W is; a public id wins.
WORKSPACE_REF = """("publicId" = %(workspace)s OR slug = %(workspace)s)
    ORDER BY "publicId" = %(workspace)s DESC
    LIMIT 1"""

# The identity that holds a token (inspect --token, revoke --token without --slug).
TOKEN_IDENTITY = """i."id" = (SELECT t."agentIdentityId" FROM agent_token t WHERE t."publicId" = %(token_public_id)s)"""

# The workspace of a token, for verify without --workspace-public-id.
TOKEN_WORKSPACE = """"id" = (
        SELECT i."workspaceId"
        FROM agent_token t
        JOIN agent_identity i ON i."id" = t."agentIdentityId"
        WHERE t."publicId" = %(token_public_id)s
    )"""


def check_access(
    conn,
    workspace: str | None,
    email: str,
    *,
    slug: str | None = None,
    lock: bool = False,
    tokens: bool = False,
    detail: str | None = None,
    params: dict | None = None,
    must_exist: bool = True,
    allow_deleted: bool = False,
    by_slug: bool = False,
    by_token: bool = False,
) -> dict:
    """Run the workspace and actor check; return the workspace, actor, identity and now
    (with tokens, the identity's tokens; with detail, that SQL's JSON, for a read).

    workspace None means the workspace of the token params["token_public_id"]
    names (verify); with by_slug, workspace is a public id or a slug (a public
    id wins if both match). With by_token, the identity is the one holding the
    token params["token_public_id"] names, not the one slug names. Raises exit
    3 for a missing (or, unless allow_deleted, deleted) workspace, exit 4 for an
    actor who may not manage it, and exit 3
    for a slug that names no identity (unless must_exist is false, as for
    create). With lock, the identity row stays locked until the transaction
    ends. `now` is the transaction's clock, which every later statement of it
    shares.
    """
    from psycopg import sql
    from psycopg.rows import dict_row

    query = sql.SQL(ACCESS_SQL).format(
        workspace=sql.SQL(TOKEN_WORKSPACE if workspace is None else WORKSPACE_REF if by_slug
                          else '"publicId" = %(workspace)s'),
        identity=sql.SQL(TOKEN_IDENTITY if by_token else "i.slug = %(slug)s"),
        lock=sql.SQL("FOR UPDATE" if lock else ""),
        tokens=sql.SQL(TOKENS_SQL).format(identity=sql.SQL('target."id"')) if tokens else sql.SQL("NULL::jsonb"),
        detail=sql.SQL(detail or "NULL::jsonb"),
    )
    params = {**(params or {}), "workspace": workspace, "email": email, "permission": MANAGE_PERMISSION,
              "slug": slug}
    row = conn.cursor(row_factory=dict_row).execute(query, params).fetchone()
    if row["workspace_id"] is None:
        hint = did_you_mean(workspace, managed_names(conn, email)) if by_slug else ""
        raise AdminError(EXIT_NOT_FOUND, f"workspace {quote(workspace) if by_slug else workspace} not found"
                         + hint + rls_hint(conn, "workspace"))
    workspace = row["workspace_public_id"]
    if row["workspace_deleted"] and not allow_deleted:
        raise AdminError(EXIT_NOT_FOUND, f"workspace {workspace} has been deleted")
    denied = {"workspace_id": row["workspace_id"], "actor_id": row["actor_id"]}
    if row["actor_id"] is None:
        raise AccessDenied(f"no Kan user has the email {quote(email)}" + rls_hint(conn, "user"),
                           condition="not_a_kan_user", **denied)
    if not row["is_member"]:
        raise AccessDenied(f"{quote(row['actor_email'])} is not an active member of workspace {workspace}"
                           + rls_hint(conn, "workspace_members"), condition="not_an_active_member", **denied)
    if not row["is_manager"]:
        raise AccessDenied(f"{quote(row['actor_email'])} lacks the {MANAGE_PERMISSION} permission in workspace {workspace}",
                           condition="lacks_workspace_manage", **denied)
    identity = row["identity"] and json_times(row["identity"])
    if by_token and identity is None:
        raise AdminError(EXIT_NOT_FOUND, f"no token {params['token_public_id']} in workspace {workspace}")
    if slug is not None and identity is None and must_exist:
        raise AdminError(EXIT_NOT_FOUND, f"no agent identity {slug} in workspace {workspace}")
    token_list = row["tokens"]
    if tokens and identity is not None and identity["version"] != row["seen_version"]:
        # We waited for the lock while another session changed the identity (every
        # change to its tokens touches it too): read them again, in a snapshot
        # taken after the lock.
        token_list = conn.execute(
            sql.SQL("SELECT {tokens}").format(tokens=sql.SQL(TOKENS_SQL).format(identity=sql.Placeholder("id"))),
            {"id": identity["id"]},
        ).fetchone()[0]
    return {
        "now": row["now"],
        "workspace_id": row["workspace_id"],
        "workspace_public_id": workspace,
        "workspace_deleted": row["workspace_deleted"],
        "actor_id": row["actor_id"],
        "actor_email": row["actor_email"],
        "identity": identity,
        "tokens": [json_times(t) for t in token_list or []],
        "detail": row["detail"],
    }


def rls_hint(conn, table: str) -> str:
    """A hint for a "not found" that row level security may have caused, or ''."""
    from psycopg.rows import dict_row

    row = conn.cursor(row_factory=dict_row).execute(READABLE_SQL, {"tables": [table]}).fetchone()
    if row is None or row["past_rls"]:
        return ""
    return f" (row level security may hide rows of {table} from role {row['role']}: run agent-identity doctor)"


JSON_TIMES = ("createdAt", "updatedAt", "pausedAt", "revokedAt", "expiresAt", "lastUsedAt", "nextExpiresAt")


def json_times(record: dict) -> dict:
    """A row the database sent as JSON (to_jsonb), its timestamps made datetimes again."""
    return {**record, **{key: record[key] and datetime.fromisoformat(record[key])
                         for key in JSON_TIMES if key in record}}


def check_identity(conn, args: argparse.Namespace, **options) -> dict:
    """check_access for the workspace (--workspace-public-id, or --workspace by slug or
    public id) and the identity (--slug, or the holder of --token) a command was given.

    Afterwards args.workspace_public_id is the workspace's public id and args.slug the
    identity's slug, whichever way they were named. A token looked up with no workspace
    named is answered the same whether it does not exist or lies in a workspace the
    actor may not manage (exit 3, "no token … in a workspace you manage"); the second is
    audited there as access.denied.
    """
    by_token = bool(getattr(args, "token", None)) and not getattr(args, "slug", None)
    params = dict(options.pop("params", None) or {})
    if by_token:
        params["token_public_id"] = args.token
    try:
        access = check_access(conn, args.workspace_public_id, args.actor_email, slug=getattr(args, "slug", None),
                              by_slug=args.workspace_by_slug, by_token=by_token, params=params, **options)
    except AdminError as refused:
        if not by_token or args.workspace_public_id or refused.exit_code not in (EXIT_NOT_FOUND, EXIT_FORBIDDEN):
            raise
        unknown = f"no token {args.token} in a workspace you manage"
        if isinstance(refused, AccessDenied):
            refused.exit_code, refused.message, refused.token_public_id = EXIT_NOT_FOUND, unknown, args.token
            raise  # run() records the probe, then says what an unknown token gets
        raise AdminError(EXIT_NOT_FOUND, unknown) from None
    args.workspace_public_id = access["workspace_public_id"]
    if access["identity"] is not None:
        args.slug = access["identity"]["slug"]
    return access


def write(conn, statement: str, params: dict) -> dict:
    """Run one mutation statement; return the identity row as it leaves it."""
    from psycopg.types.json import Jsonb

    params = dict(params, metadata=Jsonb(params["metadata"]))
    return json_times(conn.execute(statement, params).fetchone()[0])


def record_denial(conn, args: argparse.Namespace, denied: AccessDenied) -> None:
    """Write the access.denied event of a refused command, in its own transaction."""
    import psycopg
    from psycopg.types.json import Jsonb

    # The token aimed at: verify's, or revoke --token's.
    token_public_id = denied.token_public_id or getattr(args, "token", None)
    params = {
        "audit_public_id": new_public_id(),
        "workspace_id": denied.workspace_id,
        "slug": getattr(args, "slug", None),
        "token_public_id": token_public_id,
        "actor_id": denied.actor_id,
        "actor_email": args.actor_email,
        "reason": getattr(args, "reason", None),
        "metadata": Jsonb({
            "command": args.command,
            "condition": denied.condition,
            "slug": getattr(args, "slug", None),
            "tokenPublicId": token_public_id,
            "toolVersion": __version__,
        }),
    }
    try:
        with transaction(conn, args.lock_timeout):
            conn.execute(ACCESS_DENIED_SQL, params)
    except psycopg.Error as exc:
        denied.message += f" (this refusal could not be audited: {exc.diag.message_primary or type(exc).__name__})"


def audit_params(args: argparse.Namespace, access: dict, action: str, metadata: dict) -> dict:
    return {
        "audit_public_id": new_public_id(),
        "workspace_id": access["workspace_id"],
        "action": action,
        "actor_id": access["actor_id"],
        "actor_email": access["actor_email"],
        "reason": args.reason,
        "metadata": dict(metadata, toolVersion=__version__),
    }


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
    return {"ok": True, "command": "schema", "sql": schema_sql(args.db_schema)}


def completion_spec(parser) -> dict[str, dict[str, tuple[str, ...] | None]]:
    """Every command's long options, from the parser itself: an option maps to the values
    it takes (choices, scopes), () for a value to type (a file for PATH), None for a flag."""
    spec = {}
    for name, sub in parser.commands.items():
        options: dict[str, tuple[str, ...] | None] = {}
        for action in sub._actions:
            if not action.option_strings:  # a positional: offer its choices as words
                options.update(dict.fromkeys(action.choices or (), None))
            for option in (o for o in action.option_strings if o.startswith("--")):
                if action.nargs == 0:
                    options[option] = None
                elif option == "--scopes":
                    options[option] = SCOPES
                else:
                    options[option] = tuple(action.choices or ())
        spec[name] = options
    return spec


FILE_OPTIONS = ("--token-file",)

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


def slug_taken(args: argparse.Namespace) -> AdminError:
    return AdminError(
        EXIT_CONFLICT,
        f"the slug {args.slug} is taken in workspace {args.workspace_public_id} "
        "(slugs are never reused, revoked identities included)",
    )


def cmd_create(conn, args: argparse.Namespace) -> dict:
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
            with transaction(conn, args.lock_timeout):
                access = check_identity(conn, args, must_exist=False)
                if access["identity"] is not None:
                    raise slug_taken(args)
                expires = expires_at(args.expires_in, access["now"])
                audit = audit_params(args, access, "identity.created", {
                    "previousStatus": None,
                    "newStatus": "active",
                    "slug": args.slug,
                    "displayName": args.display_name,
                    "scopes": args.scopes,
                    "tokenPublicId": issued and issued.public_id,
                    "tokenName": args.token_name,
                    "expiresIn": args.expires_in.text,
                    "expiresAt": iso(expires),
                })
                if issued:
                    identity = write(conn, CREATE_SQL, {
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
                raise slug_taken(args) from None
            raise
        write_token_file(fd, issued, args)
    return mutation_result(
        args,
        True,
        identity=identity_view(identity, args.workspace_public_id),
        token=token_result(issued, args.token_name, args.scopes, expires, args.token_file,
                           expiresIn=args.expires_in.text),
        auditEvent={"action": audit["action"], "metadata": audit["metadata"]},
    )


def cmd_rotate(conn, args: argparse.Namespace) -> dict:
    """Issue a new token with the same scopes; revoke the live ones, or let them run out the grace."""
    issued = None if args.dry_run else issue_token()
    with token_file(args.token_file, args.dry_run) as fd:
        with transaction(conn, args.lock_timeout):
            access = check_identity(conn, args, lock=True, tokens=True)
            identity, now, tokens = access["identity"], access["now"], access["tokens"]
            if identity["status"] == "revoked":
                raise AdminError(
                    EXIT_CONFLICT, f"agent identity {args.slug} is revoked; a revoked identity gets no tokens"
                )
            if not tokens:
                raise AdminError(EXIT_CONFLICT, f"agent identity {args.slug} has no token to rotate")
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
                identity = write(conn, ROTATE_SQL, {
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
        identity=identity_view(identity, args.workspace_public_id),
        token=token_result(issued, token_name, scopes, expires, args.token_file,
                           rotatedFromPublicId=source["publicId"], expiresIn=lifetime.text,
                           lifetimeKept=args.expires_in is None, previousScopes=previous_scopes),
        revokedTokenPublicIds=metadata["revokedTokenPublicIds"],
        gracedTokens=metadata["gracedTokens"],
        auditEvent={"action": audit["action"], "metadata": metadata},
    )


def cmd_revoke(conn, args: argparse.Namespace) -> dict:
    """revoke: one token with --token, else the whole identity."""
    return cmd_revoke_token(conn, args) if args.token else cmd_set_status(conn, args)


def cmd_revoke_token(conn, args: argparse.Namespace) -> dict:
    """Revoke one token of an identity, leaving the identity and its other tokens alone."""
    with transaction(conn, args.lock_timeout):
        access = check_identity(conn, args, lock=True, tokens=True)
        identity = access["identity"]
        token = next((t for t in access["tokens"] if t["publicId"] == args.token), None)
        if token is None:
            raise AdminError(EXIT_NOT_FOUND, f"agent identity {args.slug} has no token {args.token}")
        if token["revokedAt"] is not None:
            return mutation_result(
                args, False, identity=identity_view(identity, args.workspace_public_id),
                message=f"token {args.token} of agent identity {args.slug} is already revoked; nothing to change",
            )
        audit = audit_params(args, access, "identity.token_revoked", {
            "previousStatus": identity["status"],
            "newStatus": identity["status"],
            "revokedTokenPublicIds": [token["publicId"]],
        })
        if not args.dry_run:
            identity = write(conn, REVOKE_TOKEN_SQL, {
                **audit, "identity_id": identity["id"], "identity_ids": [identity["id"]], "token_id": token["id"],
                "revoke_token_ids": [token["id"]],
            })
    return mutation_result(
        args,
        True,
        identity=identity_view(identity, args.workspace_public_id),
        revokedTokenPublicIds=[token["publicId"]],
        auditEvent={"action": audit["action"], "metadata": audit["metadata"]},
    )


def cmd_set_status_all(conn, args: argparse.Namespace) -> dict:
    """pause, resume and revoke --all: every identity of the workspace the move applies
    to, in one transaction, with one audit event each, sharing a batch id."""
    from psycopg.types.json import Jsonb

    new_status, allowed_from, action = TRANSITIONS[args.command]
    with transaction(conn, args.lock_timeout):
        access = check_identity(conn, args, detail=BULK_DETAIL, params={"from_statuses": list(allowed_from)})
        targets = access["detail"]
        if not targets:
            return mutation_result(args, False, identities=[], message=(
                f"no agent identity in workspace {args.workspace_public_id} is "
                f"{' or '.join(allowed_from)}; nothing to change"))
        batch = {"batchId": new_public_id(), "batchCount": len(targets)}
        events = [{
            "publicId": new_public_id(),
            "identityId": target["id"],
            "metadata": {
                "previousStatus": target["status"], "newStatus": new_status,
                "revokedTokenPublicIds": [t["publicId"] for t in target["tokens"]] if new_status == "revoked" else [],
                **batch, "toolVersion": __version__,
            },
        } for target in targets]
        if not args.dry_run:
            conn.execute(BULK_SQL, {
                "identity_ids": [t["id"] for t in targets], "status": new_status,
                "revoke_token_ids": [token["id"] for t in targets for token in t["tokens"]]
                if new_status == "revoked" else [],
                "actor_id": access["actor_id"], "actor_email": access["actor_email"], "reason": args.reason,
                "workspace_id": access["workspace_id"], "action": action, "events": Jsonb(events),
            })
    return mutation_result(
        args, True, workspacePublicId=args.workspace_public_id, batchId=batch["batchId"],
        identities=[{"publicId": t["publicId"], "slug": t["slug"], "previousStatus": t["status"],
                     "status": new_status} for t in targets],
        revokedTokenPublicIds=[token for event in events for token in event["metadata"]["revokedTokenPublicIds"]],
        auditEvent={"action": action, "metadata": dict(batch, count=len(events))},
    )


def cmd_set_status(conn, args: argparse.Namespace) -> dict:
    """pause, resume and revoke: move an identity to another status (or, with --all, every one)."""
    if args.all:
        return cmd_set_status_all(conn, args)
    new_status, allowed_from, action = TRANSITIONS[args.command]
    with transaction(conn, args.lock_timeout):
        access = check_identity(conn, args, lock=True, tokens=new_status == "revoked")
        identity = access["identity"]
        previous = identity["status"]
        if previous == new_status:
            return mutation_result(
                args, False, identity=identity_view(identity, args.workspace_public_id),
                message=f"agent identity {args.slug} is already {new_status}; nothing to change",
            )
        if previous not in allowed_from:
            raise AdminError(
                EXIT_CONFLICT,
                f"cannot {args.command} agent identity {args.slug}: it is {previous}"
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
            identity = write(conn, STATUS_SQL, {
                **audit,
                "identity_id": identity["id"],
                "identity_ids": [identity["id"]],
                "status": new_status,
                "revoke_token_ids": [t["id"] for t in revoked_tokens],
            })
    return mutation_result(
        args,
        True,
        identity=identity_view(identity, args.workspace_public_id),
        previousStatus=previous,
        revokedTokenPublicIds=metadata["revokedTokenPublicIds"],
        auditEvent={"action": action, "metadata": audit["metadata"]},
    )


def cmd_inspect(conn, args: argparse.Namespace) -> dict:
    """Show an identity, its tokens (never their hashes) and its latest events."""
    with transaction(conn, args.lock_timeout, read_only=True):
        access = check_identity(conn, args, tokens=True, detail=EVENTS_DETAIL, params={"events": args.events})
    identity, now, tokens = access["identity"], access["now"], access["tokens"]
    view = identity_view(identity, args.workspace_public_id)
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
    warnings = [
        expiry_warning(t["publicId"], args.slug, t["expiresAt"], now)
        for t in tokens if is_live(t, now) and expiring_soon(t["expiresAt"], now)
    ]
    return {"ok": True, "command": "inspect", "now": iso(now), "identity": view, "warnings": warnings}


def keyset_page(detail: dict, key: str, limit: int, missing_cursor: str) -> tuple[list[dict], str | None]:
    """The rows of a page the database read one row past (list's, audit's), their times
    parsed, and the --after of the next page (None on the last); exit 3 with
    missing_cursor when the --after given names nothing."""
    if not detail["cursorFound"]:
        raise AdminError(EXIT_NOT_FOUND, missing_cursor)
    rows = [json_times(row) for row in detail[key]]
    return rows[:limit], rows[limit - 1]["publicId"] if len(rows) > limit else None


def cmd_list(conn, args: argparse.Namespace) -> dict:
    """List a workspace's identities, newest first, a page at a time."""
    with transaction(conn, args.lock_timeout, read_only=True):
        access = check_identity(conn, args, detail=LIST_DETAIL, params={
            "status": args.status, "limit": args.limit + 1, "after": args.after, "within": EXPIRING_SOON,
        })
    page = access["detail"]
    rows, next_cursor = keyset_page(page, "identities", args.limit,
                                    f"no agent identity {args.after} in workspace {args.workspace_public_id}")
    now = access["now"]
    identities = [
        dict(
            identity_view(row, args.workspace_public_id),
            liveTokens=row["liveTokens"],
            nextExpiresAt=iso(row["nextExpiresAt"]),
            expiringSoon=expiring_soon(row["nextExpiresAt"], now),
            lastUsedAt=iso(row["lastUsedAt"]),
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
    ]
    return {
        "ok": True, "command": "list", "now": iso(now), "workspacePublicId": args.workspace_public_id,
        "identities": identities, "nextCursor": next_cursor, "warnings": warnings,
    }


def cmd_workspaces(conn, args: argparse.Namespace) -> dict:
    """The workspaces the actor may manage, by the access check's rule, with what each holds."""
    from psycopg.rows import dict_row

    with transaction(conn, args.lock_timeout, read_only=True):
        rows = conn.cursor(row_factory=dict_row).execute(
            WORKSPACES_SQL, {"email": args.actor_email, "permission": MANAGE_PERMISSION}).fetchall()
    return {"ok": True, "command": "workspaces", "actorEmail": args.actor_email, "workspaces": [
        {"publicId": row["publicId"], "slug": row["slug"], "name": row["name"],
         "identities": {status: row[status] for status in STATUSES},
         "liveTokens": row["liveTokens"], "nextExpiresAt": iso(row["nextExpiresAt"])}
        for row in rows
    ]}


def cmd_expiring(conn, args: argparse.Namespace) -> dict:
    """Live tokens expiring within --within, in every workspace the actor manages (or one)."""
    params = {"email": args.actor_email, "permission": MANAGE_PERMISSION, "within": args.within.delta}
    with transaction(conn, args.lock_timeout, read_only=True):
        if args.workspace_public_id:
            access = check_identity(conn, args, detail=EXPIRING_TOKENS, params=params)
            found, now = access["detail"], access["now"]
        else:
            found, now = conn.execute(EXPIRING_SQL + ", timezone('utc', now())", params).fetchone()
    tokens = [json_times(token) for token in found]
    return {"ok": True, "command": "expiring", "now": iso(now), "within": args.within.text, "tokens": [
        {"workspacePublicId": t["workspacePublicId"], "workspaceSlug": t["workspaceSlug"], "slug": t["slug"],
         "identityPublicId": t["identityPublicId"], "publicId": t["publicId"], "name": t["name"],
         "expiresAt": iso(t["expiresAt"])}
        for t in tokens
    ]}


def event_view(event: dict, workspace_public_id: str) -> dict:
    """An audit event as audit prints it (and --jsonl streams it: each line whole)."""
    return {
        "publicId": event["publicId"],
        "createdAt": iso(event["createdAt"]),
        "workspacePublicId": workspace_public_id,
        "action": event["action"],
        "actorEmail": event["actorEmail"],
        "identityPublicId": event["identityPublicId"],
        "slug": event["slug"],
        "tokenPublicId": event["tokenPublicId"],
        "reason": event["reason"],
        "metadata": event["metadata"],
        "sequence": event["sequence"],  # its place in the workspace's audit chain, and its hash there
        "hash": event["hash"],
    }


def audit_page(conn, args: argparse.Namespace, after: str | None) -> dict:
    """One page of audit's events, newest first, after the event named by after, in a
    read-only transaction of its own: the access check and the page in one query."""
    moments = {f"{bound}_{part}": getattr(getattr(args, bound), part, None)
               for bound in ("since", "until") for part in ("ago", "at")}
    params = dict(moments, after=after, limit=args.limit + 1, token_filter=args.token, actor=args.actor,
                  actions=args.action)
    # check_identity names the workspace, and the identity a --token belongs to, in what it
    # is given: only the workspace carries over (a --token stays a filter on that token).
    named = argparse.Namespace(**vars(args))
    with transaction(conn, args.lock_timeout, read_only=True):
        access = check_identity(conn, named, detail=AUDIT_DETAIL, params=params)
    args.workspace_public_id = named.workspace_public_id
    events, next_cursor = keyset_page(access["detail"], "events", args.limit,
                                      f"no audit event {after} in workspace {args.workspace_public_id}")
    return {"now": access["now"], "events": [event_view(event, args.workspace_public_id) for event in events],
            "nextCursor": next_cursor}


def later_pages(conn, args: argparse.Namespace, cursor: str | None):
    """audit --all: the pages after the first, each in a transaction of its own (so a slow
    reader holds no snapshot, lock or idle transaction open), until the last; then it
    closes the connection, which it owns from the first page on."""
    import psycopg

    try:
        while cursor:
            page = audit_page(conn, args, cursor)
            yield page["events"]
            cursor = page["nextCursor"]
    except AccessDenied as denied:  # the actor lost workspace:manage mid-way
        record_denial(conn, args, denied)
        raise
    except psycopg.Error as exc:
        raise database_error(exc, args.lock_timeout, target_of(conn)) from exc
    finally:
        conn.close()


def cmd_audit(conn, args: argparse.Namespace) -> dict:
    """The workspace's audit events, newest first, a page at a time; with --all (and
    --jsonl), every page, streamed as it is read. audit head and audit verify: its chain."""
    if args.mode == "head":
        return cmd_audit_head(conn, args)
    if args.mode == "verify":
        return cmd_audit_verify(conn, args)
    if args.limit is None:
        args.limit = LIST_LIMIT_MAX if args.all else LIST_LIMIT_DEFAULT
    page = audit_page(conn, args, args.after)
    result = {"ok": True, "command": "audit", "now": iso(page["now"]), "workspacePublicId": args.workspace_public_id,
              "events": page["events"], "nextCursor": page["nextCursor"]}
    if args.all:
        result["nextCursor"] = None
        if page["nextCursor"]:
            result["later"] = later_pages(conn, args, page["nextCursor"])  # run() leaves conn to it
    return result


def chain_workspaces(conn, args: argparse.Namespace) -> list[dict]:
    """What audit head and audit verify look at: the workspace given (after the access
    check), or every one the actor manages; each with its public id, slug and chain head."""
    from psycopg.rows import dict_row

    if args.workspace_public_id:
        detail = ("""jsonb_build_object('slug', (SELECT w.slug FROM workspace w WHERE w."id" = ws."id"), 'head', """
                  + CHAIN_HEAD.replace("{workspace}", 'ws."id"') + ")")
        access = check_identity(conn, args, detail=detail)
        return [{"id": access["workspace_id"], "publicId": access["workspace_public_id"],
                 "slug": access["detail"]["slug"], "head": access["detail"]["head"]}]
    return conn.cursor(row_factory=dict_row).execute(
        MANAGED_HEADS_SQL, {"email": args.actor_email, "permission": MANAGE_PERMISSION}).fetchall()


def cmd_audit_head(conn, args: argparse.Namespace) -> dict:
    """The head of each audit chain (SEQUENCE:HASH), to pin somewhere the database's
    writers cannot reach; audit verify --expect-head checks the chain still extends it."""
    with transaction(conn, args.lock_timeout, read_only=True):
        workspaces = chain_workspaces(conn, args)
    heads = []
    for workspace in workspaces:
        head = json_times(workspace["head"])
        heads.append({
            "workspacePublicId": workspace["publicId"], "slug": workspace["slug"],
            "sequence": head["sequence"], "hash": head["hash"],
            "head": str(Head(head["sequence"], head["hash"])) if head["sequence"] else None,
            "createdAt": iso(head["createdAt"]), "unchained": head["unchained"],
        })
    return {"ok": True, "command": "audit head", "workspaces": heads}


def cmd_audit_verify(conn, args: argparse.Namespace) -> dict:
    """Recompute every event's hash from the rows alone, in chain order, streamed, and say
    per workspace whether the chain is intact, its head, and the first break."""
    reports = []
    with transaction(conn, args.lock_timeout, read_only=True):
        for workspace in chain_workspaces(conn, args):
            with contextlib.closing(chain_events(conn, workspace["id"])) as events:
                report = check_chain(events, args.expect_head)
            reports.append({"workspacePublicId": workspace["publicId"], "slug": workspace["slug"], **report})
    return {"ok": True, "command": "audit verify", "intact": all(r["intact"] for r in reports),
            "expectHead": args.expect_head and str(args.expect_head), "workspaces": reports}


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


def verify_format(args: argparse.Namespace) -> dict | None:
    """The verdict when the token's form alone refuses it, before any database work."""
    args.presented_token = read_token(args)
    args.token_public_id, defect = parse_token(args.presented_token)
    return verify_result(defect) if defect else None


def cmd_verify(conn, args: argparse.Namespace) -> dict:
    """Say whether the server should accept a token now, and if not, why. Writes nothing
    but the access.denied event of a refused actor."""
    from argon2.exceptions import InvalidHashError, VerifyMismatchError

    try:
        with transaction(conn, args.lock_timeout, read_only=True):
            access = check_identity(conn, args, detail=VERIFY_DETAIL,
                                    params={"token_public_id": args.token_public_id}, allow_deleted=True)
    except AdminError as refused:
        if args.workspace_public_id or refused.exit_code not in (EXIT_NOT_FOUND, EXIT_FORBIDDEN):
            raise  # the operator named the workspace: say what is wrong with it
        if isinstance(refused, AccessDenied):
            # A token of a workspace the actor may not manage gets the answer an unknown
            # id gets, so verify tells nobody whether a token exists; the audit event
            # in the token's workspace records the probe.
            refused.token_public_id = args.token_public_id
            record_denial(conn, args, refused)
        return verify_result("unknown_token")
    row = access["detail"]
    if row is None:
        return verify_result("unknown_token")
    row = dict(json_times(row), workspacePublicId=access["workspace_public_id"])
    try:
        token_hasher().verify(row["tokenHash"], args.presented_token)
    except VerifyMismatchError:
        return verify_result("hash_mismatch", row)
    except InvalidHashError:
        raise AdminError(EXIT_INTERNAL, f"the stored hash of token {row['publicId']} is not an argon2 hash") from None
    status = row["identity"]["status"]
    reason = (
        "token_revoked" if row["revokedAt"] is not None
        else "token_expired" if row["expired"]
        else "identity_paused" if status == "paused"
        else "identity_revoked" if status == "revoked"
        else "workspace_deleted" if access["workspace_deleted"]
        else None
    )
    return verify_result(reason, row)


# Kan's tables and the agent tables as every query finds them: through the
# search_path, as Kan's own unqualified queries do; with their schema and columns.
DOCTOR_COLUMNS_SQL = """
SELECT t.name AS table, n.nspname AS schema, a.attname AS column, format_type(a.atttypid, a.atttypmod) AS type
FROM unnest(%(tables)s::text[]) AS t(name)
JOIN pg_class c ON c."oid" = to_regclass(quote_ident(t.name))
JOIN pg_namespace n ON n."oid" = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c."oid" AND a.attnum > 0 AND NOT a.attisdropped
"""

# Whether this role reads a table's rows (found through the search_path): the
# SELECT privilege, and past row level security (owner, superuser, BYPASSRLS,
# or a policy that admits it). doctor asks it of every table; a command asks it
# of a table whose row it needed and did not find (rls_hint).
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
JOIN pg_class c ON c."oid" = to_regclass(quote_ident(t.name))
JOIN pg_roles r ON r.rolname = current_user
"""

# Live tokens whose hash was made with other argon2 parameters (an earlier
# version's, 50-100 times slower to check): they verify, and rotating re-hashes.
OLD_HASHES_SQL = """
SELECT count(*)
FROM agent_token
WHERE "revokedAt" IS NULL AND ("expiresAt" IS NULL OR "expiresAt" > timezone('utc', now()))
  AND left("tokenHash", length(%(prefix)s)) <> %(prefix)s
"""

# What the server says each of the tool's limits is, inside one of its transactions.
LIMITS_SQL = """
SELECT name, setting FROM pg_settings WHERE name = ANY(%(names)s)
"""

# The triggers schema adds, and whether each fires in this session: disabled
# ('D'), or enabled only for origin sessions ('O') while this role's sessions
# run as replicas (session_replication_role), they do not.
SCHEMA_TRIGGERS = {
    "agent_token": ("agent_token_only_ends",),
    "agent_identity": ("agent_identity_revocation_is_final",),
    "agent_audit_event": ("agent_audit_event_chain", "agent_audit_event_append_only", "agent_audit_event_no_truncate"),
}
TRIGGERS_SQL = """
SELECT wanted.name, t.tgenabled::text AS enabled, current_setting('session_replication_role') AS role_mode
FROM unnest(%(tables)s::text[], %(names)s::text[]) AS wanted(tab, name)
LEFT JOIN pg_trigger t ON t.tgrelid = to_regclass(quote_ident(wanted.tab)) AND t.tgname = wanted.name
"""


def chain_health(conn) -> list[dict]:
    """Every workspace's audit chain, whoever manages it, verified: intact, broken, or
    not yet chained (events from before the chain, which applying schema chains)."""
    from psycopg.rows import dict_row

    health = []
    for workspace in conn.cursor(row_factory=dict_row).execute(AUDITED_WORKSPACES_SQL).fetchall():
        with contextlib.closing(chain_events(conn, workspace["id"])) as events:
            report = check_chain(events)
        fault = report["break"]
        state = ("intact" if report["intact"]
                 else "not_chained" if fault["kind"] == "unchained" and not report["events"] else "broken")
        health.append({"workspacePublicId": workspace["publicId"], "slug": workspace["slug"], "state": state,
                       **report})
    return health


def check_chains(chains: list[dict], check) -> None:
    """doctor's line about the audit chains."""
    def name(chain: dict) -> str:
        return f"{chain['slug'] or chain['workspacePublicId']} ({chain['workspacePublicId']})"

    intact = [c for c in chains if c["state"] == "intact"]
    broken = [c for c in chains if c["state"] == "broken"]
    waiting = [c for c in chains if c["state"] == "not_chained"]
    said = [f"{len(intact)} of {len(chains)} workspaces intact ({sum(c['events'] for c in intact)} events)"]
    said += [f"broken: {name(c)} at {c['break']['sequence'] or 'an unchained event'} ({c['break']['kind']})"
             for c in broken]
    if waiting:
        said.append(f"not yet chained: {', '.join(map(name, waiting))}")
    fixes = []
    if waiting:
        fixes.append("apply `agent-identity schema` as the owner of Kan's tables: it chains the older events")
    if broken:
        fixes.append("run `agent-identity audit verify --workspace W` for each broken one and treat its log as "
                     "tampered with from that event on (docs/runbook.md)")
    check("audit chains", not (broken or waiting), "; ".join(said), "; ".join(fixes))


def cmd_doctor(args: argparse.Namespace) -> dict:
    """Check what the tool needs, one line each, with how to fix what fails."""
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str, fix: str | None = None) -> bool:
        # A detail may quote what the operator gave, like an error does: scrubbed the same way.
        checks.append({"name": name, "ok": ok, "detail": scrub_tokens(detail), "fix": None if ok else fix})
        return ok

    chains: list[dict] = []

    def result() -> dict:
        return {"ok": True, "command": "doctor", "healthy": all(c["ok"] for c in checks), "checks": checks,
                "chains": chains}

    try:
        conn = connect(database_url(args))
    except AdminError as exc:
        check("connection", False, exc.message, "set --database-url, DATABASE_URL or POSTGRES_URL to the Kan database")
        return result()
    import psycopg
    from psycopg.rows import dict_row

    target = target_of(conn)
    try:
        with conn, transaction(conn, args.lock_timeout, read_only=True):
            version = conn.execute("SELECT current_setting('server_version')").fetchone()[0]
            check("connection", True, f"PostgreSQL {version}, {describe_target(target)}")
            limits = session_limits(args.lock_timeout)
            shown = dict(conn.execute(LIMITS_SQL, {"names": list(limits)}).fetchall())
            wrong = [f"{name} is {shown.get(name)}" for name, value in limits.items()
                     if shown.get(name) != value.removesuffix("ms")]
            check("session limits", not wrong,
                  "; ".join(wrong) if wrong else "lock, statement and idle timeouts and UTC hold in each transaction",
                  "something between the tool and the server drops SET LOCAL: connect to PostgreSQL directly")
            cursor = conn.cursor(row_factory=dict_row)
            tables = [*KAN_TABLES, *EXPECTED_COLUMNS]
            found: dict[str, dict[str, str]] = {}
            schemas: dict[str, str] = {}
            for row in cursor.execute(DOCTOR_COLUMNS_SQL, {"tables": tables}):
                found.setdefault(row["table"], {})[row["column"]] = row["type"]
                schemas[row["table"]] = row["schema"]
            missing = [t for t in KAN_TABLES if t not in found]
            kan_schema = schemas.get("workspace")
            kan_ok = check("Kan tables", not missing,
                           f"missing: {', '.join(missing)} (looked through search_path "
                           f"{conn.execute('SHOW search_path').fetchone()[0]})" if missing
                           else f"{len(KAN_TABLES)} present, in schema {kan_schema}",
                           "connect to Kan's database (is this the right one?), or give the role the search_path "
                           "Kan uses (ALTER ROLE ... SET search_path, or options=-c search_path=... in a direct URL)")
            drift = []
            for table, columns in EXPECTED_COLUMNS.items():
                if table not in found:
                    drift.append(f"{table} is missing")
                    continue
                for column, expected in columns.items():
                    actual = found[table].get(column)
                    if actual != expected:
                        drift.append(f'{table}."{column}" is {actual or "missing"}, expected {expected}')
            apart = sorted({f"{t} is in schema {schemas[t]}" for t in EXPECTED_COLUMNS
                            if t in schemas and kan_schema and schemas[t] != kan_schema})
            if apart:
                drift.append(f"Kan's workspace is in schema {kan_schema}, but " + ", ".join(apart))
            agent_schema = schemas.get("agent_identity")
            check("agent tables", not drift,
                  "; ".join(drift) if drift else f"3 present, in schema {agent_schema}, every column as expected",
                  f"apply `agent-identity schema --db-schema {kan_schema or 'SCHEMA'}` as the owner of Kan's tables "
                  "(a migration if a column differs)")
            if not drift:
                old = conn.execute(OLD_HASHES_SQL, {"prefix": ARGON2_PHC_PREFIX}).fetchone()[0]
                check("token hashes", True,
                      f"{old} live token{'' if old == 1 else 's'} still carr{'ies' if old == 1 else 'y'} older, "
                      "slower argon2 parameters: they verify; rotate them to re-hash (agent-identity rotate)"
                      if old else f"every live token is hashed with argon2id m={ARGON2_MEMORY_KIB} KiB, "
                                  f"t={ARGON2_TIME_COST}, p={ARGON2_PARALLELISM}")
            if not drift:
                pairs = [(table, name) for table, names in SCHEMA_TRIGGERS.items() for name in names]
                rows = cursor.execute(TRIGGERS_SQL, {"tables": [t for t, _ in pairs],
                                                     "names": [n for _, n in pairs]}).fetchall()
                replica = bool(rows) and rows[0]["role_mode"] == "replica"
                firing = {"A", "R"} if replica else {"A", "O"}
                silent = [row["name"] + (" is missing" if row["enabled"] is None else " does not fire here")
                          for row in rows if row["enabled"] not in firing]
                check("triggers", not silent,
                      "; ".join(silent) + (" (this role's session_replication_role is replica)" if replica else "")
                      if silent else f"all {len(rows)} fire: revocation is final, the audit log is append-only "
                                     "and chained",
                      "apply `agent-identity schema` as the owner (it recreates them), or ALTER TABLE ... ENABLE "
                      "TRIGGER ...; and ALTER ROLE ... RESET session_replication_role")
                chains.extend(chain_health(conn))
                check_chains(chains, check)
            present = [t for t in tables if t in found]
            blind = [row["table"] for row in cursor.execute(READABLE_SQL, {"tables": present})
                     if not (row["can_select"] and row["past_rls"])]
            if present:
                check("row level security", not blind,
                      f"this role cannot read rows of: {', '.join(blind)}" if blind
                      else f"this role reads all {len(present)} tables",
                      "connect as the tables' owner, or create the role of docs/security.md")
            if args.workspace_public_id:
                try:
                    email = actor_email(args)  # validated as every command validates it
                    if kan_ok and not blind:
                        check_access(conn, args.workspace_public_id, email, by_slug=args.workspace_by_slug)
                        check("actor", True, f"{email} manages workspace {args.workspace_public_id}")
                except AdminError as exc:
                    check("actor", False, exc.message,
                          "give --admin-user-email or AGENT_IDENTITY_ADMIN_EMAIL" if exc.exit_code == EXIT_USAGE
                          else "an admin of the workspace can grant workspace:manage in Kan")
    except psycopg.Error as exc:
        check("database", False, database_error(exc, args.lock_timeout, target).message, "see the message")
    return result()


OFFLINE_COMMANDS = {"help": cmd_help, "schema": cmd_schema, "completion": cmd_completion}
DATABASE_COMMANDS = {
    "create": cmd_create,
    "rotate": cmd_rotate,
    "pause": cmd_set_status,
    "resume": cmd_set_status,
    "revoke": cmd_revoke,
    "inspect": cmd_inspect,
    "list": cmd_list,
    "workspaces": cmd_workspaces,
    "expiring": cmd_expiring,
    "verify": cmd_verify,
    "audit": cmd_audit,
}
MUTATING_COMMANDS = ("create", "rotate", "pause", "resume", "revoke")


def run(args: argparse.Namespace) -> dict:
    """Check the arguments that argparse cannot, then run the command."""
    if args.command in OFFLINE_COMMANDS:
        return OFFLINE_COMMANDS[args.command](args)
    # --workspace takes a slug or a public id; --workspace-public-id only a public id.
    args.workspace_by_slug = bool(getattr(args, "workspace", None))
    if args.workspace_by_slug:
        args.workspace_public_id = args.workspace
    if args.command == "doctor":
        # Every failure is one of its checks, the connection's included.
        return cmd_doctor(args)
    if getattr(args, "token_file", None) == "-" and args.json and args.command in ("create", "rotate"):
        raise AdminError(EXIT_USAGE, "give --json or --token-file -, not both: with --token-file -, standard "
                                     "output carries the token alone, for a secret manager to read")
    if args.command == "inspect" and args.token and args.slug:
        raise AdminError(EXIT_USAGE, "give --slug or --token, not both (see `agent-identity inspect --help`)")
    if args.command in ("inspect", "revoke", "pause", "resume"):
        chosen = [flag for flag in ("slug", "token", "all") if getattr(args, flag, None)]
        if len(chosen) > 1 and chosen != ["slug", "token"]:
            raise AdminError(EXIT_USAGE, f"give one of --{' or --'.join(chosen)}, not both "
                                         f"(see `{PROG} {args.command} --help`)")
        if not getattr(args, "token", None):
            missing = [flag for flag, value in (
                ("--workspace-public-id or --workspace", args.workspace_public_id),
                ("--slug", args.slug or getattr(args, "all", False))) if not value]
            if missing:
                alternatives = " or --all" if hasattr(args, "all") else ""
                alternatives += " (or --token)" if hasattr(args, "token") else ""
                raise AdminError(EXIT_USAGE, f"the following arguments are required: {', '.join(missing)}"
                                             f"{alternatives} (see `{PROG} {args.command} --help`)")
    if args.command == "audit" and args.mode:
        listing = [option for option, value in (
            ("--since", args.since), ("--until", args.until), ("--actor", args.actor), ("--action", args.action),
            ("--slug", args.slug), ("--token", args.token), ("--limit", args.limit), ("--after", args.after),
            ("--jsonl", args.jsonl), ("--all", args.all)) if value]
        if listing:
            raise AdminError(EXIT_USAGE, f"audit {args.mode} looks at whole chains: {listing[0]} is for listing "
                                         f"events (see `{PROG} audit --help`)")
        if args.expect_head and (args.mode != "verify" or not args.workspace_public_id):
            raise AdminError(EXIT_USAGE, "--expect-head goes with audit verify and one workspace "
                                         "(--workspace or --workspace-public-id)")
    elif args.command == "audit":
        if args.expect_head:
            raise AdminError(EXIT_USAGE, "--expect-head goes with audit verify")
        if not (args.workspace_public_id or args.token):
            raise AdminError(EXIT_USAGE, "the following arguments are required: --workspace-public-id or "
                                         f"--workspace (or --token) (see `{PROG} audit --help`)")
        if args.all and not args.jsonl:
            raise AdminError(EXIT_USAGE, "--all streams every page, one event per line: give it with --jsonl")
        if args.json and args.jsonl:
            raise AdminError(EXIT_USAGE, "give --json (one object, one page) or --jsonl (one event per line), "
                                         "not both")
    if args.command in MUTATING_COMMANDS:
        if args.confirm and args.dry_run:
            raise AdminError(EXIT_USAGE, "give --confirm or --dry-run, not both")
        if not (args.confirm or args.dry_run):
            raise AdminError(
                EXIT_USAGE,
                f"{args.command} changes the database: add --confirm to do it, or --dry-run to see what it would do",
            )
    else:
        args.dry_run = False
    if args.command in ("create", "rotate", "verify"):
        forbid_core_dumps()  # before a token exists in this process
    if args.command == "verify":
        # A malformed or mistyped token is refused before any connection, as a server should.
        verdict = verify_format(args)
        if verdict:
            return verdict
    args.actor_email = actor_email(args)
    url = database_url(args)

    import psycopg

    conn = connect(url)
    target = target_of(conn)
    result = {}
    try:
        result = DATABASE_COMMANDS[args.command](conn, args)
    except AccessDenied as denied:
        if not args.dry_run:
            record_denial(conn, args, denied)
        raise
    except psycopg.Error as exc:
        raise database_error(exc, args.lock_timeout, target) from exc
    finally:
        if "later" not in result:  # audit --all reads its later pages as it prints them, then closes
            conn.close()
    if args.command in MUTATING_COMMANDS:
        result["target"] = target  # where it wrote (or would have): staging or production?
    return result


# --- Output -----------------------------------------------------------------


TABLE_CELL_MIN = 8  # a cut cell keeps at least this much, the … included


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns aligned on the widest cell; empty cells show as '-'."""
    cells = [headers] + [[cell if cell not in (None, "") else "-" for cell in row] for row in rows]
    widths = column_widths(cells)
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells
    )


def column_widths(cells: list[list]) -> list[int]:
    return [max(len(str(row[i])) for row in cells) for i in range(len(cells[0]))]


def fit_table(headers: list[str], rows, width: int | None, *, drop: tuple[str, ...] = (),
              shrink: tuple[str, ...] = ()) -> str:
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
        f"status     {identity['status']}",
        f"created    {render_time(identity['createdAt'], now)}",
    ]
    for label, key in (("updated", "updatedAt"), ("paused", "pausedAt"), ("revoked", "revokedAt")):
        if identity[key]:
            lines.append(f"{label:<10} {render_time(identity[key], now)}")
    lines = [visible(line) for line in lines]
    if width is not None:
        lines = [line if len(line) <= width else line[:width - 1] + "…" for line in lines]
    lines += ["", "tokens"]
    lines.append(fit_table(
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
    lines.append(fit_table(
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
    return [fit_table(
        ["SLUG", "PUBLIC ID", "STATUS", "LIVE TOKENS", "NEXT EXPIRY", "LAST USED", "CREATED", "DISPLAY NAME"],
        lambda short: [
            [i["slug"], i["publicId"], i["status"], str(i["liveTokens"]),
             render_expiry(i["nextExpiresAt"], now, short) if i["liveTokens"] else None,
             render_time(i["lastUsedAt"], now, short), render_time(i["createdAt"], now, short), i["displayName"]]
            for i in result["identities"]
        ],
        width, drop=("CREATED", "LAST USED", "PUBLIC ID"), shrink=("DISPLAY NAME", "SLUG"),
    )]


def render_workspaces(result: dict, width: int | None) -> list[str]:
    if not result["workspaces"]:
        return [f"no workspace that {quote(result['actorEmail'])} may manage"]
    return [fit_table(
        ["PUBLIC ID", "SLUG", "ACTIVE", "PAUSED", "REVOKED", "LIVE TOKENS", "NEXT EXPIRY", "NAME"],
        lambda short: [
            [w["publicId"], w["slug"], str(w["identities"]["active"]), str(w["identities"]["paused"]),
             str(w["identities"]["revoked"]), str(w["liveTokens"]),
             render_expiry(w["nextExpiresAt"]) if w["liveTokens"] else None, w["name"]]
            for w in result["workspaces"]
        ],
        width, drop=("REVOKED", "PAUSED"), shrink=("NAME", "SLUG"),
    )]


def render_expiring(result: dict, width: int | None) -> list[str]:
    if not result["tokens"]:
        return [f"no live token expires within {result['within']}"]
    now = from_iso(result["now"])
    return [fit_table(
        ["EXPIRES", "WORKSPACE", "IDENTITY", "TOKEN", "NAME"],
        lambda short: [[render_time(t["expiresAt"], now, short), t["workspaceSlug"] or t["workspacePublicId"],
                        t["slug"], t["publicId"], t["name"]] for t in result["tokens"]],
        width, drop=(), shrink=("NAME", "IDENTITY", "WORKSPACE"),
    )]


def render_audit(result: dict, width: int | None) -> list[str]:
    if not result["events"]:
        return [f"no audit events in workspace {result['workspacePublicId']} match"]
    now = from_iso(result["now"])
    return [fit_table(
        ["WHEN", "ACTION", "IDENTITY", "TOKEN", "ACTOR", "REASON"],
        lambda short: [[render_time(e["createdAt"], now, short), e["action"], e["slug"], e["tokenPublicId"],
                        e["actorEmail"], e["reason"]] for e in result["events"]],
        width, drop=("TOKEN",), shrink=("REASON", "ACTOR", "IDENTITY"),
    )]


def render_audit_head(result: dict) -> list[str]:
    if not result["workspaces"]:
        return ["no workspace to show"]
    lines = []
    for w in result["workspaces"]:
        name = f"{w['slug'] or w['workspacePublicId']} ({w['workspacePublicId']})"
        head = f"head {w['head']} ({w['createdAt']})" if w["head"] else "no chained events yet"
        unchained = f"; {w['unchained']} events not yet chained" if w["unchained"] else ""
        lines.append(f"{name}: {head}{unchained}")
    return lines


def render_audit_verify(result: dict) -> list[str]:
    if not result["workspaces"]:
        return ["no workspace to verify"]
    lines = []
    for w in result["workspaces"]:
        name = f"{w['slug'] or w['workspacePublicId']} ({w['workspacePublicId']})"
        if w["intact"]:
            head = f", head {w['head']}" if w["head"] else ""
            lines.append(f"✓ {name}: intact, {w['events']} event{'' if w['events'] == 1 else 's'}{head}")
        else:
            fault = w["break"]
            where = f" at {fault['sequence']}" if fault["sequence"] else ""
            lines.append(f"✗ {name}: broken{where} ({fault['kind']}): {fault['message']}")
            lines.append(f"  the first {w['events']} events are intact" + (f", up to {w['head']}" if w["head"] else ""))
    return lines


def render_doctor(result: dict) -> list[str]:
    lines = []
    for check in result["checks"]:
        lines.append(f"{'✓' if check['ok'] else '✗'} {check['name']}: {check['detail']}")
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


class Output:
    """Where results and diagnostics go: data on stdout, notes and errors on stderr.

    Everything written for a person passes visible(), so nothing stored or
    typed can drive the terminal; --json is pure ASCII (non-ASCII escaped), so it
    is valid UTF-8 JSON under any locale.
    """

    def __init__(self, stdout, stderr, as_json: bool, wide: bool = False, lines: bool = False):
        self.stdout = stdout
        self.stderr = stderr
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
        command = result["command"]
        if self.lines and command == "audit":
            self.event_lines(result)
            return
        if self.as_json:
            self._json(result)
            return
        notes: list[str] = []
        if command == "help":
            lines = [result["text"].rstrip()]
        elif command == "schema":
            lines = [result["sql"].rstrip()]
        elif command == "completion":
            self._write(self.stdout, result["script"])  # a script: written as made, not escaped
            return
        elif command == "inspect":
            lines = render_inspect(result, self.width)
        elif command == "list":
            lines = render_list(result, self.width)
            if result["nextCursor"]:
                notes = [f"more: add --after {result['nextCursor']}"]
        elif command == "audit head":
            lines = render_audit_head(result)
        elif command == "audit verify":
            lines = render_audit_verify(result)
        elif command == "audit":
            lines = render_audit(result, self.width)
            if result["nextCursor"]:
                notes = [f"more: add --after {result['nextCursor']}"]
        elif command == "workspaces":
            lines = render_workspaces(result, self.width)
        elif command == "expiring":
            lines = render_expiring(result, self.width)
        elif command == "verify":
            lines = render_verify(result)
        elif command == "doctor":
            lines = render_doctor(result)
        else:
            lines, notes = render_mutation(result)
            if (result.get("token") or {}).get("tokenFile") == "-":
                # Standard output is the token's alone, for a secret manager to read:
                # the summary goes to stderr.
                self._write(self.stderr, visible("\n".join(lines)) + "\n")
                if result["token"].get("secret"):
                    self._write(self.stdout, result["token"]["secret"] + "\n")
                self.notes(notes)
                return
        text = visible("\n".join(lines)) + "\n"
        if self.colour and command in ("doctor", "audit verify"):  # the marks are ours: coloured after visible()
            text = re.sub(r"^([✓✗])", lambda mark: f"\033[{32 if mark[1] == '✓' else 31}m{mark[1]}\033[0m",
                          text, flags=re.M)
        self._write(self.stdout, text)
        self.notes(notes)

    def event_lines(self, result: dict) -> None:
        """audit --jsonl: each event a line of ASCII JSON, a page per write, as pages are read."""
        import json

        for page in itertools.chain([result["events"]], result.get("later", ())):
            if page:
                self._write(self.stdout, "".join(json.dumps(event) + "\n" for event in page))
        if result["nextCursor"]:
            self.notes([f"more: add --after {result['nextCursor']}"])

    def notes(self, notes: list[str]) -> None:
        for note in notes:
            self._write(self.stderr, visible(f"{PROG}: {note}\n"))

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
            self._write(self.stderr, visible(f"{PROG}: error: {message}\n"))

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
        """One write and a flush, so a failure shows here, not at exit."""
        if stream is None:  # the descriptor was closed when the tool started (>&-)
            import errno

            raise OSError(errno.EBADF, "the stream is closed")
        stream.write(text)
        stream.flush()


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
        command = next((arg for arg in argv if arg in self.commands), None)
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


def workspace_options(sub: argparse.ArgumentParser, *, required: bool, help_text: str) -> None:
    """--workspace-public-id W, or --workspace W (a slug, as in Kan's URLs, or a public id)."""
    group = sub.add_mutually_exclusive_group(required=required)
    group.add_argument("--workspace-public-id", type=parse_public_id, metavar="W", help=f"{help_text}: its public id")
    group.add_argument("--workspace", type=parse_workspace, metavar="W",
                       help=f"{help_text}: its slug or public id (a public id wins if both match)")


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", metavar="URL", type=parse_database_url,
                        help="PostgreSQL URL (default: DATABASE_URL, else POSTGRES_URL, else libpq's PG* variables)")
    parser.add_argument("--admin-user-email", metavar="EMAIL",
                        help="the Kan user you act as (default: AGENT_IDENTITY_ADMIN_EMAIL)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--lock-timeout", type=parse_lock_timeout, metavar="SECONDS",
                        help=f"how long to wait while another session changes the same identity "
                             f"(default {LOCK_TIMEOUT_DEFAULT}); then exit 5, nothing written")
    parser.add_argument("--debug", action="store_true", help="show a traceback for internal errors")


EXAMPLES = {
    "create": """\
examples:
  agent-identity create --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --display-name "Release bot" --token-name ci \\
      --scopes boards:read,cards:write --reason "ticket OPS-12" --dry-run
  agent-identity create ... --expires-in 30d --token-file release-bot.token \\
      --confirm
  agent-identity create ... --token-file - --confirm | vault kv put \\
      secret/kan/release-bot token=-     # only the token goes to stdout""",
    "rotate": """\
examples:
  agent-identity rotate --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --reason "leaked in a log" --confirm
  agent-identity rotate --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --grace 1h --token-file new.token --confirm   # the old token works 1h
  agent-identity rotate --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --token-name ci-2025 --dry-run""",
    "doctor": """\
examples:
  agent-identity doctor
  agent-identity doctor --workspace-public-id Ab12Cd34Ef56 \\
      --admin-user-email you@example.com
Exit 0 when every check passes, 6 otherwise.""",
    "verify": """\
examples:
  agent-identity verify < release-bot.token
  agent-identity verify --token-file release-bot.token \\
      --workspace-public-id Ab12Cd34Ef56 --json
The token is read from standard input or a file, never from the command line;
exit 0 when valid, 7 when not.""",
    "pause": """\
examples:
  agent-identity pause --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --reason "investigating" --confirm
  agent-identity pause --workspace-public-id Ab12Cd34Ef56 --all \\
      --reason "incident" --confirm     # every active identity, one transaction""",
    "resume": """\
example:
  agent-identity resume --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --confirm
  agent-identity resume --workspace acme-eng --all --dry-run""",
    "revoke": """\
examples:
  agent-identity revoke --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --reason "retired" --confirm
  agent-identity revoke --token Tk12Tk34Tk56 --reason "leaked" --confirm""",
    "inspect": """\
examples:
  agent-identity inspect --workspace-public-id Ab12Cd34Ef56 --slug release-bot
  agent-identity inspect --token kan_agent_Tk12Tk34Tk56   # whose token is this?
  agent-identity inspect --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --events 50 --json""",
    "list": """\
examples:
  agent-identity list --workspace-public-id Ab12Cd34Ef56
  agent-identity list --workspace-public-id Ab12Cd34Ef56 --status active --json
  agent-identity list --workspace-public-id Ab12Cd34Ef56 --limit 100 \\
      --after Xy12Xy34Xy56""",
    "schema": """\
examples:
  agent-identity schema | psql --single-transaction -v ON_ERROR_STOP=1 \\
      "$POSTGRES_URL"
  agent-identity schema --db-schema kan | psql --single-transaction \\
      -v ON_ERROR_STOP=1 "$POSTGRES_URL"
Apply it as the owner of Kan's tables: it also indexes Kan's workspace_members.""",
    "help": """\
example:
  agent-identity help rotate""",
    "audit": """\
examples:
  agent-identity audit --workspace acme-eng --since 24h   # the last 24 hours
  agent-identity audit --workspace acme-eng --action access.denied --since 7d
  agent-identity audit --token Tk12Tk34Tk56   # a token's whole story
  agent-identity audit --workspace-public-id Ab12Cd34Ef56 --slug release-bot \\
      --since 2026-11-01 --until 2026-12-01 --json
  agent-identity audit --workspace acme-eng --jsonl --all > acme-eng-audit.jsonl
  agent-identity audit verify           # every chain you manage; 10 at a break
  agent-identity audit head --workspace acme-eng --json >> pinned-heads.jsonl
  agent-identity audit verify --workspace acme-eng --expect-head 42:<the hash>
Times are UTC; --since and --until take a duration back from now or an ISO time.""",
    "workspaces": """\
examples:
  agent-identity workspaces
  agent-identity workspaces --json""",
    "expiring": """\
examples:
  agent-identity expiring              # every workspace you manage, 7 days
  agent-identity expiring --workspace acme-eng --within 30d --json
Exit 9 when any token expires within the window (for a cron job), 0 when none.""",
    "completion": """\
examples:
  source <(agent-identity completion bash)         # in ~/.bashrc
  agent-identity completion zsh > agent-identity.zsh   # source it in ~/.zshrc
  agent-identity completion fish > agent-identity.fish
      # into ~/.config/fish/completions/""",
}

MAIN_EPILOG = f"""\
Every command but help and schema needs a database (--database-url,
DATABASE_URL or POSTGRES_URL) and an actor (--admin-user-email or
AGENT_IDENTITY_ADMIN_EMAIL) who holds workspace:manage in the workspace.
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
    """The whole command line; with wanted, only those commands get their options (the
    others are listed, and cannot be parsed or shown in this run)."""
    # The global options are accepted after the command name too; there they
    # default to SUPPRESS so they do not overwrite values given before it.
    global_options = ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS, allow_abbrev=False)
    add_global_options(global_options)

    parser = ArgumentParser(
        prog=PROG,
        description="Manage the machine identities of AI agents in a Kan database.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_global_options(parser)
    parser.set_defaults(lock_timeout=parse_lock_timeout(LOCK_TIMEOUT_DEFAULT))
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, *, workspace: bool = True, slug: bool = True, mutating: bool = False,
                by_token: bool = False):
        if wanted is not None and name not in wanted:
            subparsers.add_parser(name, help=help_text, add_help=False)
            return Unbuilt()
        sub = subparsers.add_parser(
            name, help=help_text, description=help_text, parents=[global_options],
            epilog=EXAMPLES[name] + "\n\n" + EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        )
        # With by_token, --token can name the identity instead: then the workspace and
        # the slug are optional, and run() asks for them when --token is not given.
        if workspace:
            workspace_options(sub, required=not by_token, help_text="the Kan workspace")
        if slug:
            sub.add_argument("--slug", required=not by_token, type=parse_slug, metavar="S",
                             help="the identity's slug, unique in its workspace")
        if mutating:
            sub.add_argument("--reason", type=parse_reason, metavar="R", help="why, for the audit log")
            sub.add_argument("--confirm", action="store_true", help="make the change")
            sub.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")
        return sub

    def token_options(sub: argparse.ArgumentParser, expires_default: str | None, expires_help: str) -> None:
        """What create and rotate share: how long the new token lives, and where it goes."""
        sub.add_argument("--expires-in", type=parse_expires_in, default=expires_default, metavar="DURATION",
                         help=f"30m, 12h, 90d, 1w ... at most 365d, or never ({expires_help})")
        sub.add_argument("--token-file", metavar="PATH", type=parse_path,
                         help="write the token to this new file (mode 0600); - writes only the token to "
                              "stdout, for a secret manager, and the summary to stderr")

    sub = command("help", "show usage for the tool or one command", workspace=False, slug=False)
    sub.add_argument("topic", nargs="?", metavar="COMMAND")
    sub.set_defaults(parser=parser)  # the text help prints is this parser's own
    sub = command("schema", "print the SQL that creates the agent tables (idempotent)", workspace=False, slug=False)
    sub.add_argument("--db-schema", type=parse_db_schema, default=DB_SCHEMA_DEFAULT, metavar="NAME",
                     help=f"the PostgreSQL schema that holds Kan's tables (default {DB_SCHEMA_DEFAULT})")

    sub = command("completion", "print a shell completion script (bash, zsh or fish)", workspace=False, slug=False)
    sub.add_argument("shell", choices=("bash", "zsh", "fish"))

    sub = command("create", "create an active identity and its first token", mutating=True)
    sub.add_argument("--display-name", required=True, type=parse_display_name, metavar="D")
    sub.add_argument("--token-name", required=True, type=parse_display_name, metavar="T")
    sub.add_argument("--scopes", required=True, type=parse_scopes, metavar="a,b",
                     help=f"comma-separated, from: {', '.join(SCOPES)}")
    token_options(sub, EXPIRES_DEFAULT, f"default {EXPIRES_DEFAULT}")

    sub = command("rotate", "issue a new token; revoke the old ones, or give them a grace",
                  mutating=True)
    sub.add_argument("--token-name", type=parse_display_name, metavar="T",
                     help="name of the new token (default: the old one's)")
    sub.add_argument("--grace", type=parse_grace, default="0", metavar="DURATION",
                     help="let the old live tokens work this much longer instead of revoking them "
                          "(at most 7d; default 0: revoke at once)")
    sub.add_argument("--scopes", type=parse_scopes, metavar="a,b",
                     help="the new token's scopes (default: the old one's)")
    token_options(sub, None, "default: the lifetime the rotated token was issued with")

    def bulk_option(sub) -> None:
        sub.add_argument("--all", action="store_true",
                         help="every identity of the workspace this applies to, in one transaction")

    bulk_option(command("pause", "pause an active identity (its tokens stop working until resumed)",
                        mutating=True, by_token=True))
    bulk_option(command("resume", "resume a paused identity", mutating=True, by_token=True))
    sub = command("revoke", "revoke an identity and all its tokens for good, or with --token one token",
                  mutating=True, by_token=True)
    sub.add_argument("--token", type=parse_token_id, metavar="TOKEN_ID",
                     help="revoke only this token (its public id, or kan_agent_<id>), leaving the identity "
                          "alone; it names the identity and workspace too")
    bulk_option(sub)

    sub = command("inspect", "show an identity, its tokens and its latest audit events", by_token=True)
    sub.add_argument("--token", type=parse_token_id, metavar="TOKEN_ID",
                     help="the identity holding this token (its public id, or kan_agent_<id>), in any "
                          "workspace you manage")
    sub.add_argument("--events", type=parse_event_count, default=EVENTS_DEFAULT, metavar="N",
                     help=f"how many audit events to show (default {EVENTS_DEFAULT})")
    sub.add_argument("--wide", action="store_true", help="print the tables whole, however wide the terminal")

    sub = command("list", "list a workspace's identities, newest first, a page at a time", slug=False)
    sub.add_argument("--status", choices=STATUSES)
    sub.add_argument("--limit", type=parse_list_limit, default=LIST_LIMIT_DEFAULT, metavar="N",
                     help=f"identities per page (default {LIST_LIMIT_DEFAULT}, at most {LIST_LIMIT_MAX})")
    sub.add_argument("--after", type=parse_public_id, metavar="PUBLIC_ID",
                     help="start after this identity: the nextCursor of the previous page")
    sub.add_argument("--wide", action="store_true", help="print the table whole, however wide the terminal")

    sub = command("audit", "show a workspace's audit events, newest first; verify its hash chain",
                  slug=False, by_token=True)
    sub.add_argument("mode", nargs="?", choices=("verify", "head"), metavar="verify|head",
                     help="verify: recompute every audit chain (the workspace's, or every one you manage) and "
                          f"exit {EXIT_CHAIN_BROKEN} at a break; head: print each chain's head, SEQUENCE:HASH, "
                          "to pin")
    sub.add_argument("--expect-head", type=parse_head, metavar="SEQ:HASH",
                     help="with verify: also fail unless the chain still holds this head, pinned earlier")
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
    sub.add_argument("--jsonl", action="store_true",
                     help="print one JSON event per line, as read (for a SIEM or jq)")
    sub.add_argument("--all", action="store_true", help="with --jsonl: every page, streamed, not only the first")
    sub.add_argument("--wide", action="store_true", help="print the table whole, however wide the terminal")

    command("workspaces", "list the workspaces you may manage, with their identities and tokens",
            workspace=False, slug=False)

    sub = command("expiring", "list live tokens that expire soon, in every workspace you manage (or one)",
                  workspace=False, slug=False)
    workspace_options(sub, required=False, help_text="only this workspace")
    sub.add_argument("--within", type=parse_within, default=EXPIRING_WITHIN_DEFAULT, metavar="DURATION",
                     help=f"how soon: 30m, 12h, 7d, 2w ... (default {EXPIRING_WITHIN_DEFAULT}); "
                          f"exit {EXIT_EXPIRING} when any is found")

    sub = command("doctor", "check the connection, tables, row level security and your access",
                  workspace=False, slug=False)
    workspace_options(sub, required=False, help_text="also check that the actor may manage this workspace")

    sub = command("verify", "say whether the server would accept a token (read from stdin), and if not, why",
                  workspace=False, slug=False)
    workspace_options(sub, required=False,
                      help_text="the workspace the token must belong to (default: the token's own)")
    sub.add_argument("--token-file", metavar="PATH", type=parse_path,
                     help="read the token from this file instead of stdin")

    parser.commands = dict(subparsers.choices)
    return parser


def exit_code(result: dict) -> int:
    """A result's exit code: a verdict (verify 7, doctor 6, expiring 9, audit verify 10) or success."""
    if result.get("valid") is False:
        return EXIT_INVALID_TOKEN
    if result["command"] == "expiring" and result["tokens"]:
        return EXIT_EXPIRING
    if result["command"] == "audit verify" and not result["intact"]:
        return EXIT_CHAIN_BROKEN
    return EXIT_DATABASE if result.get("healthy") is False else EXIT_OK


def deliver(out: Output, result: dict, code: int) -> int:
    """Print a result. If stdout fails (closed, full, a reader gone, an encoding it
    cannot take) or a signal comes, say so on stderr and return the exit code that
    tells: after a committed change, that it was committed and what to do; verify
    keeps its verdict; a read ends 141 on a closed pipe, else 8."""
    try:
        out.result(result)
        return code
    except (OSError, ValueError, KeyboardInterrupt) as exc:
        out.quiet_stdout()
        command = result["command"]
        if command in MUTATING_COMMANDS and result["changed"] and not result["dryRun"]:
            error = undelivered(command, "its output could not be written", exc)
            out.complain(scrub_tokens(error.message))
            return error.exit_code
        if isinstance(exc, KeyboardInterrupt):
            raise
        if command == "verify":
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


def main(argv: list[str] | None = None, stdout=None, stderr=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    out = Output(sys.stdout if stdout is None else stdout, sys.stderr if stderr is None else stderr,
                 as_json="--json" in argv, wide="--wide" in argv, lines="--jsonl" in argv)
    debug = "--debug" in argv
    # Named in a usage error's JSON even when argparse refuses the rest.
    command = next((arg for arg in argv if arg in OFFLINE_COMMANDS or arg in DATABASE_COMMANDS or arg == "doctor"),
                   None)
    try:
        with signals_as_interrupts():
            parser = build_parser(wanted=set(argv) & set(EXAMPLES))
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
        out.error(command, exc)
        return exc.exit_code
    except KeyboardInterrupt as exc:
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
        if debug:
            import traceback

            with contextlib.suppress(OSError, ValueError):
                traceback.print_exc(file=out.stderr)
        out.error(command, AdminError(
            EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {first_line(exc)} (rerun with --debug)"
        ))
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
