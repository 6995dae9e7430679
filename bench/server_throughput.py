"""How many tokens per second the Kan server's verifier checks, end to end against PostgreSQL.

    python bench/server_throughput.py [--seconds 5] [--concurrency 8] [--tokens 50]

Starts an embedded PostgreSQL (or uses AGENT_IDENTITY_TEST_DSN) with a throwaway
Kan database, issues --tokens tokens with the CLI, then runs
server/verify-agent-token.ts under Node (bench/server-throughput.mts) for --seconds
with --concurrency requests in flight on one process: form, checksum, one indexed
lookup, one argon2 verification each. It measures the tool's argon2 parameters,
then the same tokens re-hashed with argon2-cffi's defaults (what versions before
0.2 stored), so the two can be compared. Needs node and `npm ci` in server/.
docs/tokens.md records one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from argon2 import PasswordHasher  # noqa: E402

from tests import support  # noqa: E402

TSX = REPO / "server" / "node_modules" / ".bin" / "tsx"


def throughput(dsn: str, token_file: Path, seconds: float, concurrency: int) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["DATABASE_URL"] = libpq_url(dsn)
    completed = subprocess.run([str(TSX), str(REPO / "bench" / "server-throughput.mts"), str(token_file),
                                str(seconds), str(concurrency)], env=env, capture_output=True, text=True,
                               timeout=seconds * 10 + 60)
    if completed.returncode != 0:
        raise SystemExit(f"server_throughput: the verifier failed: {completed.stderr[-1500:]}")
    return json.loads(completed.stdout)


def libpq_url(dsn: str) -> str:
    """node-postgres takes a URL: the same connection, written as one (socket hosts included)."""
    from urllib.parse import quote

    params = psycopg.conninfo.conninfo_to_dict(dsn)
    auth = quote(params.get("user", "postgres")) + (f":{quote(params['password'])}" if params.get("password") else "")
    host = params.get("host", "localhost")
    if host.startswith("/"):
        return f"postgresql://{auth}@/{params['dbname']}?host={quote(host)}&port={params.get('port', 5432)}"
    return f"postgresql://{auth}@{host}:{params.get('port', 5432)}/{params['dbname']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=50)
    args = parser.parse_args()
    if not shutil.which("node") or not TSX.exists():
        print("server_throughput: needs node and server/node_modules (cd server && npm ci)", file=sys.stderr)
        return 2

    with support.throwaway_workspace() as (dsn, workspace, admin, version, folder):
        tokens = []
        for n in range(args.tokens):
            path = folder / f"t{n}"
            created = support.run_cli(
                ["create", "--workspace-public-id", workspace["publicId"], "--slug", f"load-{n}",
                 "--display-name", "Load", "--token-name", "t", "--scopes", "boards:read", "--token-file",
                 str(path), "--confirm"], dsn, {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})
            assert created.code == 0, created.stderr
            tokens.append(path.read_text().strip())
        token_file = folder / "tokens"
        token_file.write_text("\n".join(tokens) + "\n")
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
        print(f"machine: {os.cpu_count()} cores, Node {node}, PostgreSQL {version}; {args.tokens} tokens, "
              f"{args.concurrency} in flight, {args.seconds:g} s")
        rows = [("argon2id t=1 m=2048 KiB p=1 (the tool's)", throughput(dsn, token_file, args.seconds,
                                                                       args.concurrency))]
        with psycopg.connect(dsn, autocommit=True) as conn:
            hasher = PasswordHasher()
            for token in tokens:  # as 0.1 wrote them: past the triggers (what a token is never changes)
                support.outside_the_tool(conn, 'UPDATE agent_token SET "tokenHash" = %s WHERE "publicId" = %s',
                                         (hasher.hash(token), token[10:22]))
        rows.append((f"argon2id t={hasher.time_cost} m={hasher.memory_cost} KiB p={hasher.parallelism} "
                     "(before 0.2)", throughput(dsn, token_file, args.seconds, args.concurrency)))
        for name, figures in rows:
            assert figures["invalid"] == 0, figures
            print(f"{name:<46} {figures['perSecond']:>8.0f} verifications/s   median {figures['medianMs']:.1f} ms"
                  f"   p99 {figures['p99Ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
