"""Reliability figures: concurrent runs, leaked secrets and generated hostile input.

    python bench/reliability.py [--runs 16] [--mixed-rounds 4] [--examples 3000]

Starts an embedded PostgreSQL (or uses AGENT_IDENTITY_TEST_DSN), makes a
throwaway Kan database, and runs the scenarios of tests/scenarios.py, the same
code the tests assert on: N concurrent rotations of one identity, N concurrent
creates of one slug, rounds of N concurrent pause/resume/revoke/rotate whose
audit log must replay to the final state, a scan of every table and every
stderr for the tokens issued, and main() driven with generated arguments.
Prints a line per scenario, then one line per figure. docs/reliability.md
records a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from tests import scenarios, support  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=16, help="processes started at once per scenario")
    parser.add_argument("--mixed-rounds", type=int, default=4, help="rounds of mixed concurrent changes")
    parser.add_argument("--examples", type=int, default=3000, help="hypothesis examples")
    args = parser.parse_args()

    with support.test_server() as server_dsn:
        dsn = support.create_database(server_dsn)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                workspace, admin = support.Kan(conn).managed_workspace()
            email = admin["email"]
            base = ["--workspace-public-id", workspace["publicId"], "--json"]
            env = {"AGENT_IDENTITY_ADMIN_EMAIL": email}
            for slug in ["rotated", *(f"mixed-{n}" for n in range(args.mixed_rounds)), "fuzzed"]:
                support.run_cli(["create", *base, "--slug", slug, "--display-name", slug, "--token-name", "t",
                                 "--scopes", "boards:read", "--confirm"], dsn, env)

            results = [scenarios.concurrent_rotations(dsn, workspace, email, "rotated", args.runs),
                       scenarios.concurrent_creates(dsn, workspace, email, "raced", args.runs)]
            results += [scenarios.concurrent_mixed(dsn, workspace, email, f"mixed-{n}", args.runs, seed=n)
                        for n in range(args.mixed_rounds)]
            leaks, tokens_checked = secret_scan(dsn, workspace, email)
            fuzz = scenarios.fuzz_main(dsn, workspace, email, "fuzzed", args.examples, fail_fast=False)
        finally:
            support.drop_database(server_dsn, dsn)

    print(f"{'scenario':<40} {'runs':>5} {'ok':>5} {'exit 5':>7} {'lost':>5} {'tracebacks':>10}  problems")
    for figures in results + [fuzz]:
        print(f"{figures.name:<40} {figures.runs:>5} {figures.successes:>5} {figures.conflicts:>7} "
              f"{figures.lost_writes:>5} {figures.tracebacks:>10}  {len(figures.problems)}")
        for problem in figures.problems[:5]:
            print(f"    {problem}")
    concurrent = results
    print(f"concurrent runs: {sum(f.runs for f in concurrent)}")
    print(f"successes: {sum(f.successes for f in concurrent)}")
    print(f"conflicts (exit 5): {sum(f.conflicts for f in concurrent)}")
    print(f"lost writes: {sum(f.lost_writes for f in concurrent + [fuzz])}")
    print(f"leaked secrets: {leaks} (of {tokens_checked} tokens, in every table and every stderr)")
    print(f"tracebacks: {sum(f.tracebacks for f in concurrent + [fuzz])}")
    print(f"undocumented exits: {sum(f.undocumented_exits for f in concurrent + [fuzz])}")
    print(f"hypothesis examples: {fuzz.runs} (exit codes {dict(sorted(fuzz.exit_codes.items()))})")
    problems = sum(len(f.problems) for f in concurrent + [fuzz]) + leaks
    return 1 if problems else 0


def secret_scan(dsn: str, workspace: dict, email: str) -> tuple[int, int]:
    """Issue tokens through every path, then look for them where they must never be."""
    base = ["--workspace-public-id", workspace["publicId"]]
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": email}
    runs = [support.run_cli(["rotate", *base, "--slug", "rotated", "--grace", "1h", "--confirm", "--json"], dsn, env)
            for _ in range(3)]
    tokens = [run.json["token"]["secret"] for run in runs]
    checks = [support.run_cli(["verify", "--json"], dsn, env, input=token) for token in tokens]
    checks += [support.run_cli(["inspect", *base, "--slug", "rotated", "--events", "100"], dsn, env),
               support.run_cli(["verify", tokens[0]], dsn, env)]
    with psycopg.connect(dsn) as conn:
        stored = support.database_text(conn)
    places = [stored] + [run.stderr for run in runs + checks] + [run.stdout for run in checks]
    return sum(1 for token in tokens for text in places if token in text), len(tokens)


if __name__ == "__main__":
    sys.exit(main())
