"""The project holds itself to what it says: every command is documented, exemplified,
budgeted, planned and pooled; one exit-code table; arguments stay as parsed; short
functions; no unused names."""

import ast
import importlib
import re
import shutil
import subprocess
import sys

import pytest

import agent_identity_admin as tool
from tests import support

MODULE = ast.parse(support.SCRIPT.read_text())
DATABASE_COMMANDS = [name for name, command in tool.COMMANDS.items() if command.database]


def covered(module: str) -> set[str]:
    """The commands a test module says it covers (its COVERED)."""
    return set(importlib.import_module(f"tests.{module}").COVERED)


@pytest.mark.parametrize("name", list(tool.COMMANDS))
def test_every_command_has_a_help_example_that_runs_it(name):
    assert re.search(rf"^  agent-identity {name}\b", tool.COMMANDS[name].examples, re.M), name


@pytest.mark.parametrize("module", ["test_round_trips", "test_query_plans", "test_pooler"])
def test_every_database_command_is_budgeted_planned_and_pooled(module):
    """A new command lands with its round-trip budget, its query plans checked, and a step in
    the pooler's lifecycle (doctor, which connects by itself, too)."""
    wanted = set(DATABASE_COMMANDS) | ({"doctor"} if module == "test_pooler" else set())
    assert wanted - covered(module) == set(), f"{module} does not cover them"


def test_every_command_has_a_section_in_docs_usage():
    headings = re.findall(r"^##+ (.+)$", (support.REPO / "docs" / "usage.md").read_text(), re.M)
    named = {word for heading in headings for word in re.findall(r"[a-z]+", heading)}
    assert set(tool.COMMANDS) - named == set()


def exit_code_tables(text: str) -> list[dict[str, str]]:
    """Every markdown table whose first column is headed `code` or `exit`: code -> its row's text."""
    tables = []
    for table in re.findall(r"^\| (?:code|exit) \|.*\n\|[-| ]+\|\n((?:\|.*\|\n)+)", text, re.M):
        rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in table.splitlines()]
        tables.append({row[0].strip(): row[1].strip().replace("\\|", "|") for row in rows})
    return tables


def test_one_exit_code_table():
    """The tool's EXIT_CODES is the table: docs/usage.md and README.md say exactly it, and
    every other table of codes in the docs (the runbook's, of what to do) lists every code."""
    tool_table = {", ".join(map(str, exit.codes)): exit.meaning for exit in tool.EXIT_CODES}
    for document in [support.REPO / "README.md", *sorted((support.REPO / "docs").glob("*.md"))]:
        for table in exit_code_tables(document.read_text()):
            assert set(table) == set(tool_table), f"{document.name}: {sorted(set(table) ^ set(tool_table))}"
            if document.name in ("README.md", "usage.md"):
                assert table == tool_table, document.name
    codes = {code for exit in tool.EXIT_CODES for code in exit.codes}
    constants = {value for name, value in vars(tool).items() if name.startswith("EXIT_") and isinstance(value, int)}
    assert constants == codes == set(tool.EXIT_KINDS), "every exit code has a kind and a meaning"


def test_arguments_stay_as_parsed():
    """Nothing assigns to args (or setattr()s it) after parsing."""
    written = [node.lineno for node in ast.walk(MODULE)
               if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
               for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
               for part in ast.walk(target)
               if isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name) and part.value.id == "args"]
    written += [node.lineno for node in ast.walk(MODULE) if isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and isinstance(node.args[0], ast.Name) and node.args[0].id == "args"]
    assert written == [], f"args is written at lines {written}"


def test_no_function_is_longer_than_80_lines():
    long = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(MODULE)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80}
    assert long == {}


def test_a_command_is_named_in_few_places():
    """What a command is lives in its record: comparisons of a command's name are few."""
    names = set(tool.COMMANDS) | {"audit verify", "audit head"}
    compared = [node.lineno for node in ast.walk(MODULE) if isinstance(node, ast.Compare)
                for side in (node.left, *node.comparators)
                if isinstance(side, ast.Constant) and side.value in names]
    assert len(compared) <= 5, compared


def test_ruff_finds_no_unused_or_undefined_names():
    ruff = shutil.which("ruff") or str(support.REPO / ".venv" / "bin" / "ruff")
    if not shutil.which(ruff):
        ruff = [sys.executable, "-m", "ruff"]
    else:
        ruff = [ruff]
    checked = subprocess.run([*ruff, "check", "--select", "F", "agent_identity_admin.py", "tests", "bench",
                              "examples"], cwd=support.REPO, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
