"""The pnpm wrapper, proven: examples/kan-monorepo's "agent:identity" script run by real pnpm.

pnpm comes from the npm registry (installed once per session in a temporary
folder). Skipped where node or npm is absent, unless AGENT_IDENTITY_REQUIRE_NODE
(CI) says it must run. pnpm runs `python3` from PATH, as in the monorepo; here
that is this virtual environment's.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support

EXAMPLE = support.REPO / "examples" / "kan-monorepo"
PNPM_VERSION = "9"


@pytest.fixture(scope="session")
def pnpm(tmp_path_factory) -> Path:
    if not (shutil.which("node") and shutil.which("npm")):
        if os.environ.get("AGENT_IDENTITY_REQUIRE_NODE"):
            pytest.fail("AGENT_IDENTITY_REQUIRE_NODE is set but node or npm is missing")
        pytest.skip("node and npm are needed to run pnpm")
    prefix = tmp_path_factory.mktemp("pnpm")
    subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", f"pnpm@{PNPM_VERSION}"],
                   check=True, capture_output=True, timeout=300)
    return prefix / "node_modules" / ".bin" / "pnpm"


@pytest.fixture
def run_pnpm(pnpm, cli_dsn):
    def run(*args: str, email: str = "nobody@example.com", dsn: str = cli_dsn) -> support.Run:
        env = support.cli_env(dsn, AGENT_IDENTITY_ADMIN_EMAIL=email)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        completed = subprocess.run([str(pnpm), *args], cwd=EXAMPLE, env=env, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=120)
        return support.Run(list(args), completed.returncode, completed.stdout, completed.stderr)
    return run


def test_help_through_pnpm(run_pnpm):
    result = run_pnpm("agent:identity", "help")
    assert result.code == 0, result.stderr
    assert "usage: agent-identity" in result.stdout


def test_json_needs_pnpm_silent(run_pnpm, operator):
    """pnpm prints its own header line first; with -s, stdout is the tool's JSON alone."""
    args = ["agent:identity", "list", "--workspace-public-id", operator.workspace["publicId"], "--json"]
    loud = run_pnpm(*args, email=operator.email)
    assert loud.code == 0 and loud.stdout.lstrip().startswith(">")
    with pytest.raises(json.JSONDecodeError):
        json.loads(loud.stdout)
    quiet = run_pnpm("-s", *args, email=operator.email)
    assert json.loads(quiet.stdout)["identities"] == []


def test_arguments_with_spaces_and_quotes_pass_through(run_pnpm, operator):
    name = "it's a \"quoted\"  name; $HOME `x` \\ done"
    result = run_pnpm("-s", "agent:identity", "create", "--workspace-public-id", operator.workspace["publicId"],
                      "--slug", "pnpm-bot", "--display-name", name, "--token-name", "two  spaces",
                      "--scopes", "boards:read", "--reason", "a reason, with; punctuation", "--dry-run", "--json",
                      email=operator.email)
    assert result.code == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["identity"]["displayName"], out["token"]["name"]) == (name, "two  spaces")


def test_every_exit_code_reaches_the_caller(run_pnpm, operator, kan, tmp_path):
    """Measured: pnpm passes the tool's exit code through unchanged."""
    w = ["--workspace-public-id", operator.workspace["publicId"]]
    token = tmp_path / "t"
    operator.create("pnpm-codes", "--token-file", str(token))
    outsider = kan.user()
    cases = {
        0: (["agent:identity", "list", *w], operator.email, None),
        2: (["agent:identity", "rotate", *w, "--slug", "pnpm-codes"], operator.email, None),
        3: (["agent:identity", "inspect", *w, "--slug", "nobody"], operator.email, None),
        4: (["agent:identity", "list", *w], outsider["email"], None),
        5: (["agent:identity", "create", *w, "--slug", "pnpm-codes", "--display-name", "X", "--token-name", "t",
             "--scopes", "boards:read", "--confirm"], operator.email, None),
        6: (["agent:identity", "list", *w], operator.email, "postgresql://u:pw@127.0.0.1:9/x"),
        7: (["agent:identity", "verify", "--token-file", str(tmp_path / "bad")], operator.email, None),
    }
    (tmp_path / "bad").write_text("kan_agent_not_a_token\n")
    for code, (args, email, dsn) in cases.items():
        result = run_pnpm("-s", *args, email=email, **({"dsn": dsn} if dsn else {}))
        assert result.code == code, (args, result.stderr)
