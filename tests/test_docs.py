"""The documentation's SQL runs: every ```sql block in README.md and docs/ executes
against a real Kan database with the agent tables (in a transaction rolled back after)."""

import re

import psycopg
import pytest

from tests import support

DOCUMENTS = [support.REPO / "README.md", *sorted((support.REPO / "docs").glob("*.md"))]


def sql_blocks():
    for document in DOCUMENTS:
        text = document.read_text()
        for match in re.finditer(r"```sql\n(.*?)```", text, re.S):
            if re.search(r"<!-- [a-z0-9.-]+-sql:", text[max(0, match.start() - 200):match.start()]):
                continue  # a marked block: run, with its own role names, by tests/test_least_privilege.py
            line = text[:match.start()].count("\n") + 1
            yield pytest.param(match.group(1), id=f"{document.name}:{line}")


@pytest.mark.parametrize("block", list(sql_blocks()))
def test_documented_sql_runs(database, block):
    with psycopg.connect(database) as conn:
        conn.execute(block)
        conn.rollback()


def test_there_is_documented_sql_to_run():
    assert len(list(sql_blocks())) >= 2  # the runbook reads the audit log with `audit` now, not SQL
