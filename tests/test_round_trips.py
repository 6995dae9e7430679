"""Few round trips: every command's statements, counted on the wire (libpq's trace).

Budgets after connecting: a mutation at most 4 round trips (BEGIN with the session
limits, the access check, the write, COMMIT); the access check, workspace and identity
lookup one query; a read 3 (BEGIN with the limits, one query for the check and what the
read shows, COMMIT). Reads were 2 in autocommit; they run in a read-only transaction now
so that the limits hold through a transaction-mode pooler, which drops session settings.
"""

import pytest

from tests import support


# Every database command's budget is tested here (tests/test_meta.py holds them to it).
COVERED = ("create", "rotate", "pause", "resume", "revoke", "list", "inspect", "verify", "workspaces", "expiring",
           "audit", "review")


@pytest.fixture
def counted(cli_dsn, operator):
    """round_trips() of a command as the operator, with its workspace."""

    def count(command, *args, stdin=""):
        argv = [command, "--workspace-public-id", operator.workspace["publicId"], *args] \
            if command not in ("verify", "workspaces", "expiring", "review") else [command, *args]
        return support.round_trips(argv, cli_dsn, operator.email, stdin)

    return count


@pytest.mark.parametrize("command, args", [
    ("create", ["--slug", "fresh", "--display-name", "F", "--token-name", "t", "--scopes", "boards:read"]),
    ("rotate", ["--slug", "counted"]),
    ("rotate", ["--slug", "counted", "--grace", "1h"]),
    ("pause", ["--slug", "counted"]),
    ("revoke", ["--slug", "counted"]),
    ("pause", ["--all"]),
    ("revoke", ["--all"]),
])
@pytest.mark.parametrize("mode", ["--confirm", "--dry-run"])
def test_a_mutation_takes_at_most_four_round_trips(counted, operator, command, args, mode):
    operator.create("counted")
    code, trips, statements = counted(command, *args, mode)
    assert code == 0
    assert trips <= 4, statements
    assert statements[0].startswith("BEGIN; SET LOCAL") and statements[-1] in ("COMMIT", "ROLLBACK")
    assert sum("workspace_members" in statement for statement in statements) == 1, "one access query"


def test_resume_and_revoking_one_token_too(counted, operator):
    token = operator.create("counted").json["token"]["publicId"]
    operator("pause", "--slug", "counted", "--confirm")
    assert counted("resume", "--slug", "counted", "--confirm")[1] <= 4
    assert counted("revoke", "--slug", "counted", "--token", token, "--confirm")[1] <= 4


@pytest.mark.parametrize("command, args, budget", [
    ("list", [], 3),
    ("list", ["--after", "CURSOR", "--status", "active"], 3),
    ("inspect", ["--slug", "counted"], 3),
    ("verify", ["--workspace-public-id", "WORKSPACE"], 3),
    ("verify", [], 3),
    ("workspaces", [], 3),
    ("expiring", [], 3),
    ("expiring", ["--workspace-public-id", "WORKSPACE"], 3),
    ("review", [], 3),
    ("review", ["--workspace-public-id", "WORKSPACE"], 3),
    ("audit", [], 3),
    ("audit", ["--since", "24h", "--action", "identity.created", "--slug", "counted", "--after", "EVENT"], 3),
])
def test_reads(counted, operator, command, args, budget):
    created = operator.create("counted").json
    operator.create("counted-2")
    token = created["token"]["secret"]
    values = {"WORKSPACE": operator.workspace["publicId"], "CURSOR": created["identity"]["publicId"],
              "EVENT": operator("audit", "--limit", "1").json["nextCursor"]}
    args = [values.get(arg, arg) for arg in args]
    code, trips, statements = counted(command, *args, stdin=token)
    assert code in (0, 9, 11)  # expiring: 9 if a token expires within the window; review: 11 at a finding
    assert trips <= budget, statements
    assert statements[0].startswith("BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ; SET LOCAL") and len(statements) == 3


def test_a_no_op_takes_no_write(counted, operator):
    operator.create("counted")
    code, trips, statements = counted("resume", "--slug", "counted", "--confirm")
    assert code == 0 and trips == 3
    assert not any(statement.lstrip().upper().startswith(("INSERT", "UPDATE", "WITH")) for statement in statements[2:])
