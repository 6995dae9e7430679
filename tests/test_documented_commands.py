"""Every command line the documentation shows is run, so the docs cannot rot.

From each code block of README.md and docs/*.md, and from each command's help
examples, every `agent-identity …` line (continuations joined, `$ ` prompts and
trailing comments dropped) runs through bash, in order, in a scratch folder,
against a fresh database seeded with the documents' own names: workspaces
Ab12Cd34Ef56 and AcmeDemo0001, the actor you@example.com, an identity
release-bot with a token, and the token files the examples read. A documented
line must never be a usage error (2) or an internal one (1), nor print a
traceback. Exits 3, 5, 7 and 9 are allowed: the examples run one after another
against changing state (a revoked identity refuses the next rotation).
Lines with an elision (`...`) are not commands.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

import agent_identity_admin as tool
from tests import support

DOCUMENTS = [support.REPO / "README.md", *sorted((support.REPO / "docs").glob("*.md"))]
ACTOR = "you@example.com"
ALLOWED = {0, 3, 5, 7, 9}
SECRET_MANAGERS = ("vault", "op", "kubectl", "gh")


def command_lines(text: str) -> list[str]:
    """The `agent-identity` command lines of a text's code."""
    lines, joined = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if joined:
            line = joined + " " + line
            joined = ""
        if line.endswith("\\"):
            joined = line[:-1].rstrip()
            continue
        line = line.removeprefix("$ ")
        line = re.sub(r"\s+#\s.*$", "", line)
        if line.startswith("agent-identity ") and "..." not in line and "…" not in line and "<the" not in line:
            lines.append(line)
    return lines


def documented() -> list:
    params = []
    for document in DOCUMENTS:
        blocks = re.findall(r"```[a-z]*\n(.*?)```", document.read_text(), re.S)
        lines = [line for block in blocks for line in command_lines(block)]
        if lines:
            params.append(pytest.param(lines, id=document.name))
    params.append(pytest.param([line for command in tool.COMMANDS.values() for line in command_lines(command.examples)],
                               id="help examples"))
    return params


@pytest.fixture
def seeded(server_dsn, tmp_path):
    """A fresh database holding what the documents name, and a folder with their token files."""
    dsn = support.create_database(server_dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        kan = support.Kan(conn)
        actor = kan.user(ACTOR)
        for public_id in ("Ab12Cd34Ef56", "AcmeDemo0001"):
            workspace_id = conn.execute(
                """INSERT INTO workspace ("publicId", name, slug) VALUES (%s, %s, %s) RETURNING id""",
                (public_id, public_id, public_id.lower())).fetchone()[0]
            kan.member({"id": workspace_id}, actor)
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": ACTOR}
    created = support.run_cli(["create", "--workspace-public-id", "Ab12Cd34Ef56", "--slug", "release-bot",
                               "--display-name", "Release bot", "--token-name", "ci", "--scopes", "boards:read",
                               "--json", "--confirm"], dsn, env)
    support.run_cli(["create", "--workspace-public-id", "AcmeDemo0001", "--slug", "release-bot", "--display-name",
                     "Release bot", "--token-name", "ci", "--scopes", "boards:read", "--confirm"], dsn, env)
    for name in ("release-bot.token", "leaked.token", "release-bot.new.token"):
        (tmp_path / name).write_text(created.json["token"]["secret"] + "\n")
    substitutes = {"Tk12Tk34Tk56": created.json["token"]["publicId"],
                   "Xy12Xy34Xy56": created.json["identity"]["publicId"]}
    yield dsn, tmp_path, substitutes
    support.drop_database(server_dsn, dsn)


@pytest.mark.parametrize("lines", documented())
def test_documented_command_lines_run(seeded, lines):
    dsn, folder, substitutes = seeded
    env = support.cli_env(None, POSTGRES_URL=dsn, AGENT_IDENTITY_ADMIN_EMAIL=ACTOR, W="Ab12Cd34Ef56")
    # The secret managers the runbook pipes tokens into, stood in for by readers that keep
    # what they were handed: each must get a whole token and nothing else.
    managers = folder / "managers"
    managers.mkdir()
    for name in SECRET_MANAGERS:
        (managers / name).write_text(f'#!/bin/sh\ncat >> "{managers}/{name}.received"\n')
        (managers / name).chmod(0o755)
    env["PATH"] = f"{managers}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    ran, handed = [], set()
    for line in lines:
        if "| psql" in line and not shutil.which("psql"):
            continue
        for placeholder, value in substitutes.items():
            line = line.replace(placeholder, value)
        completed = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=folder, env=env,
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert "Traceback" not in completed.stderr, line
        assert completed.returncode in ALLOWED, f"{line}\nexit {completed.returncode}: {completed.stderr.strip()}"
        ran.append(completed.returncode)
        handed.update(name for name in SECRET_MANAGERS if f"| {name} " in line and completed.returncode == 0)
    assert ran and ran.count(0) >= len(ran) // 2, ran
    assert {path.name.removesuffix(".received") for path in managers.glob("*.received")} == handed
    for received in managers.glob("*.received"):
        tokens = received.read_text().splitlines()
        assert tokens and all(tool.parse_token(token) == (token[10:22], None) for token in tokens), received.name
