"""The pnpm wrapper, proven: examples/kan-monorepo's "agent:identity" script run by real pnpm.

pnpm comes from the npm registry (installed once per session in a temporary
folder), and so does the example's one dependency, dotenv-cli (as Kan's own scripts
load its `.env`), from its committed lockfile into a copy of the monorepo in a
temporary folder. Skipped where node or npm is absent, unless
AGENT_IDENTITY_REQUIRE_NODE (CI) says it must run. pnpm runs `python3` from PATH, as
in the monorepo; here that is this virtual environment's.
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


@pytest.fixture(scope="session")
def monorepo(pnpm, tmp_path_factory) -> Path:
    """The example where it sits in a monorepo (the tool two folders up), its
    dependencies installed from the lockfile as `pnpm install` in Kan installs them."""
    root = tmp_path_factory.mktemp("kan")
    (root / "agent_identity_admin.py").symlink_to(support.SCRIPT)
    folder = root / EXAMPLE.relative_to(support.REPO)
    folder.mkdir(parents=True)
    for name in ("package.json", "pnpm-lock.yaml"):
        shutil.copy(EXAMPLE / name, folder / name)
    installed = subprocess.run([str(pnpm), "install", "--frozen-lockfile"], cwd=folder, capture_output=True,
                               text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr + installed.stdout
    return folder


@pytest.fixture
def run_pnpm(pnpm, monorepo, cli_dsn):
    def run(*args: str, email: str = "nobody@example.com", dsn: str | None = cli_dsn,
            input: str | None = None) -> support.Run:
        env = support.cli_env(dsn, AGENT_IDENTITY_ADMIN_EMAIL=email)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        completed = subprocess.run([str(pnpm), *args], cwd=monorepo, env=env, input=input,
                                   stdin=subprocess.DEVNULL if input is None else None,
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


def test_the_script_loads_kan_s_env_as_kan_s_scripts_do(run_pnpm, monorepo, cli_dsn, operator):
    """Nothing exported but the actor: the database comes from .env's POSTGRES_URL alone."""
    env_file = monorepo / ".env"
    env_file.write_text(f"# Kan's .env\nPOSTGRES_URL={support.libpq_url(cli_dsn)}\n")
    try:
        result = run_pnpm("-s", "agent:identity", "list", "--workspace-public-id", operator.workspace["publicId"],
                          "--json", email=operator.email, dsn=None)
    finally:
        env_file.unlink()
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["identities"] == []


def test_a_token_piped_through_pnpm_silent_is_the_token_alone(run_pnpm, operator):
    w = ["--workspace-public-id", operator.workspace["publicId"]]
    created = run_pnpm("-s", "agent:identity", "create", *w, "--slug", "piped", "--display-name", "Piped",
                       "--token-name", "t", "--scopes", "boards:read", "--token-file", "-", "--confirm",
                       email=operator.email)
    assert created.code == 0, created.stderr
    token = created.stdout
    assert token.startswith("kan_agent_") and token.count("\n") == 1, "stdout is the token and nothing else"
    verified = run_pnpm("-s", "agent:identity", "verify", "--json", email=operator.email, input=token)
    assert (verified.code, json.loads(verified.stdout)["valid"]) == (0, True), verified.stderr
