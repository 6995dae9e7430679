"""Hostile and bad input, generated: main() never shows a traceback, always exits with a
documented code, and changes nothing unless asked to change something valid."""

import os

from tests import scenarios

# CI runs a few thousand examples; AGENT_IDENTITY_FUZZ_EXAMPLES=50000 for a longer local run.
EXAMPLES = int(os.environ.get("AGENT_IDENTITY_FUZZ_EXAMPLES", "3000"))


def test_generated_argument_lists(cli_dsn, operator):
    operator.create("fuzzed")
    figures = scenarios.fuzz_main(cli_dsn, operator.workspace, operator.email, "fuzzed", EXAMPLES)
    assert figures.runs == EXAMPLES
    assert (figures.tracebacks, figures.undocumented_exits, figures.lost_writes) == (0, 0, 0), figures.problems
    # The generator reaches the database and makes valid changes too, not only usage errors.
    assert figures.exit_codes.get(0, 0) > EXAMPLES // 50, figures.exit_codes
    assert {0, 2, 3, 4, 5} <= set(figures.exit_codes), figures.exit_codes
