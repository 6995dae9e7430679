"""The CLI as a subprocess where no database is involved: help, schema, usage errors.

The database URL here points at a closed port with a password in it: a
command that reached for the database would fail with exit 6, so exit 2
proves the check came first, and the password must never be printed.
"""

import json
import time

import pytest

import agent_identity_admin as tool
from tests import support
from tests.support import run_cli

UNREACHABLE = "postgresql://admin:S3cretPassw0rd@127.0.0.1:9/kan"
PASSWORD = "S3cretPassw0rd"
WORKSPACE = ["--workspace-public-id", "Ab12Cd34Ef56"]
ACTOR = {"AGENT_IDENTITY_ADMIN_EMAIL": "admin@example.com"}


def offline(*args, env=ACTOR):
    result = run_cli(list(args), UNREACHABLE, env)
    assert PASSWORD not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def test_help_lists_commands_and_exit_codes():
    result = offline("help")
    assert result.code == 0
    for command in ("create", "rotate", "pause", "resume", "revoke", "inspect", "list", "schema"):
        assert command in result.stdout
    assert "exit codes:" in result.stdout and "6  database unreachable" in result.stdout


@pytest.mark.parametrize("command", ["create", "rotate", "pause", "resume", "revoke", "inspect", "list", "schema"])
def test_help_for_a_command_shows_its_examples(command):
    result = offline("help", command)
    assert result.code == 0
    assert f"usage: agent-identity {command}" in result.stdout
    assert f"agent-identity {command} " in result.stdout.split("example")[1]


def test_help_for_an_unknown_command_is_a_usage_error():
    result = offline("help", "frobnicate")
    assert (result.code, result.stdout) == (2, "")
    assert result.stderr == (
        "agent-identity: error: no command 'frobnicate'; commands: "
        "help, schema, completion, create, rotate, pause, resume, revoke, inspect, list, audit, workspaces, expiring, "
        "review, doctor, verify\n"
    )


def test_version():
    import agent_identity_admin

    result = offline("--version")
    assert (result.code, result.stdout) == (0, f"agent-identity {agent_identity_admin.__version__}\n")


def test_schema_prints_the_ddl_without_a_database():
    result = offline("schema", env={})
    assert result.code == 0
    for table in ("agent_identity", "agent_token", "agent_audit_event"):
        assert f'CREATE TABLE IF NOT EXISTS "public".{table}' in result.stdout
        assert f'ALTER TABLE "public".{table} ENABLE ROW LEVEL SECURITY' in result.stdout


def test_schema_qualifies_every_object_with_the_schema_it_is_given():
    """Not left to the applying role's search_path: the agent tables go beside Kan's."""
    import re

    ddl = offline("schema", "--db-schema", "kan_app").stdout
    # Every object named after these words (a join's ON names a row alias or a condition, not an object;
    # ON CONFLICT and ON FUNCTION are no objects; the catalog's pg_* are found in the functions' fixed path).
    statements = re.findall(r"\b(?:CREATE TYPE|CREATE TABLE IF NOT EXISTS|ON|REFERENCES|ALTER TABLE|LOCK TABLE|FROM|JOIN|"
                            r"FUNCTION|TRIGGER \w+ ON)"
                            r"\s+((?!DELETE|true\b|[a-z]+\.\"|OLD\.|NEW\.|unnest|\(|SELECT|CONFLICT|FUNCTION|PUBLIC;|pg_|stamped\))"
                            r"[^ (\n]+)", ddl)
    assert len(statements) >= 60
    assert all(name.startswith('"kan_app".') for name in statements), statements
    assert '"public"' not in ddl


@pytest.mark.parametrize("name", ['kan"; DROP TABLE x; --', "1abc", "", "a" * 64, "kan.app"])
def test_schema_refuses_a_schema_name_that_is_not_an_identifier(name):
    result = offline("schema", "--db-schema", name)
    assert result.code == 2
    assert "is not a schema name" in result.stderr and result.stdout == ""


def test_json_help_and_schema_are_one_object():
    assert offline("help", "--json").json["text"].startswith("usage: agent-identity")
    assert "agent_token" in offline("--json", "schema").json["sql"]


MUTATIONS = [
    ["create", *WORKSPACE, "--slug", "bot", "--display-name", "Bot", "--token-name", "t", "--scopes", "boards:read"],
    ["rotate", *WORKSPACE, "--slug", "bot"],
    ["pause", *WORKSPACE, "--slug", "bot"],
    ["resume", *WORKSPACE, "--slug", "bot"],
    ["revoke", *WORKSPACE, "--slug", "bot"],
]


@pytest.mark.parametrize("args", MUTATIONS, ids=lambda args: args[0])
def test_a_mutation_without_confirm_stops_before_connecting(args):
    started = time.monotonic()
    result = offline(*args)
    assert result.code == 2
    assert result.stderr == (
        f"agent-identity: error: {args[0]} changes the database: "
        "add --confirm to do it, or --dry-run to see what it would do\n"
    )
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("args", MUTATIONS, ids=lambda args: args[0])
def test_confirm_and_dry_run_together_are_refused(args):
    result = offline(*args, "--confirm", "--dry-run")
    assert result.code == 2
    assert result.stderr == "agent-identity: error: give --confirm or --dry-run, not both\n"


def test_with_confirm_the_same_command_does_reach_for_the_database():
    """The counterpart of the tests above: with --confirm, the closed port is exit 6."""
    result = offline(*MUTATIONS[2], "--confirm")
    assert result.code == 6
    assert result.stderr.startswith("agent-identity: error: cannot connect to database ")
    assert " at 127.0.0.1:" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_usage_error_as_json_is_one_object_on_stdout():
    result = offline("--json", *MUTATIONS[1])
    assert result.code == 2
    assert result.json == {
        "ok": False,
        "command": "rotate",
        "error": {
            "code": 2,
            "kind": "usage",
            "message": "rotate changes the database: add --confirm to do it, or --dry-run to see what it would do",
        },
    }
    assert result.stderr == ""


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["frobnicate"], 'unknown command "frobnicate"'),
        ([], "the following arguments are required: COMMAND"),
        (["list"], "one of the arguments --workspace-public-id --workspace is required"),
        (["list", *WORKSPACE, "--status", "gone"], "argument --status: invalid choice: 'gone'"),
        (["inspect", *WORKSPACE, "--slug", "Bad_Slug"], "argument --slug: 'Bad_Slug' is not a slug"),
        (["inspect", *WORKSPACE, "--slug", "a" * 65], "argument --slug: is 65 characters long; the limit is 64"),
        (["inspect", *WORKSPACE, "--slug", "bot", "--events", "-1"], "argument --events: must be a whole number from 0 to 1000"),
        (["inspect", *WORKSPACE, "--slug", "bot", "--events", "1001"], "argument --events: must be a whole number"),
        (["list", "--workspace-public-id", "x' OR 1=1"], "argument --workspace-public-id: \"x' OR 1=1\" is not a public id"),
        (MUTATIONS[0][:-1] + ["boards:reed", "--confirm"], "argument --scopes: unknown scope 'boards:reed' (did you mean boards:read?)"),
        (MUTATIONS[0] + ["--reason", "x" * 1001, "--confirm"], "argument --reason: is 1001 characters long; the limit is 1000"),
        (MUTATIONS[0][:6] + ["Bot\x1b[2J", *MUTATIONS[0][7:], "--confirm"], "argument --display-name: contains a control character (U+001B)"),
        (["list", *WORKSPACE, "--conf"], 'unknown option "--conf"'),
        (["rotate", *WORKSPACE, "--slug", "bot", "--con"], 'unknown option "--con" (did you mean --confirm?)'),
    ],
)
def test_bad_input_is_one_line_naming_the_problem(args, fragment):
    result = offline(*args)
    assert result.code == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("agent-identity: error: ")
    assert fragment in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_parse_error_as_json_names_the_command():
    result = offline("--json", "create", "--slug", "x y")
    assert result.code == 2
    assert result.json["command"] == "create"
    assert result.json["error"]["message"].startswith("argument --slug: 'x y' is not a slug")




def test_global_options_work_before_and_after_the_command():
    before = offline("--json", "--admin-user-email", "a@example.com", "list", *WORKSPACE, env={})
    after = offline("list", *WORKSPACE, "--admin-user-email", "a@example.com", "--json", env={})
    for result in (before, after):
        assert result.code == 6
        assert result.json["error"]["kind"] == "database"


def test_database_url_flag_wins_over_the_environment():
    result = run_cli(
        ["--database-url", "postgresql://u:FlagPassword@127.0.0.1:7/x", "list", *WORKSPACE],
        UNREACHABLE, ACTOR,
    )
    assert result.code == 6
    assert result.stderr.startswith("agent-identity: error: cannot connect to database x at 127.0.0.1:7 as role u: ")
    assert "FlagPassword" not in result.stderr and PASSWORD not in result.stderr


def test_postgres_url_is_used_when_database_url_is_absent():
    result = run_cli(["list", *WORKSPACE], None, {**ACTOR, "POSTGRES_URL": "postgresql://u:PgUrlPass@127.0.0.1:8/x"})
    assert result.code == 6
    assert "database x at 127.0.0.1:8 as role u: " in result.stderr
    assert "PgUrlPass" not in result.stderr


def test_a_malformed_database_url_never_echoes_it():
    result = run_cli(["list", *WORKSPACE], "host=db password=Leaky Secret", ACTOR)
    assert result.code == 2
    assert "Leaky" not in result.stderr and "Secret" not in result.stderr
    assert "the database URL is not valid" in result.stderr


def test_a_nul_byte_is_a_usage_error_through_main(capsys):
    """A real argv cannot carry NUL, but main() can be handed one: still exit 2."""
    import agent_identity_admin

    code = agent_identity_admin.main(["--json", *MUTATIONS[0][:6], "Bot\x00", *MUTATIONS[0][7:], "--confirm"])
    captured = capsys.readouterr()
    assert code == 2
    error = json.loads(captured.out)["error"]
    assert error["message"].startswith("argument --display-name: contains a control character (U+0000)")


def test_an_internal_error_is_one_line_unless_debug(monkeypatch, capsys):
    """Exit 1 with one line; --debug adds the traceback."""
    import agent_identity_admin

    def broken(args):
        raise RuntimeError("something odd\nsecond line")

    monkeypatch.setitem(agent_identity_admin.COMMANDS, "schema",
                        agent_identity_admin.COMMANDS["schema"]._replace(run=broken))
    assert agent_identity_admin.main(["schema"]) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        "agent-identity: error: internal error: RuntimeError: something odd (rerun with --debug)\n"
    )
    assert agent_identity_admin.main(["schema", "--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_ctrl_c_is_exit_130(monkeypatch, capsys):
    import agent_identity_admin

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(agent_identity_admin.COMMANDS, "schema",
                        agent_identity_admin.COMMANDS["schema"]._replace(run=interrupted))
    assert agent_identity_admin.main(["--json", "schema"]) == 130
    assert json.loads(capsys.readouterr().out)["error"]["kind"] == "interrupted"


def test_the_installed_console_script_and_python_m_run():
    """pyproject installs `agent-identity`; `python -m agent_identity_admin` works too."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = shutil.which("agent-identity", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("agent-identity is not installed next to this Python (pip install -e .)")
    for command in ([script, "--version"], [sys.executable, "-m", "agent_identity_admin", "--version"]):
        completed = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.startswith("agent-identity ")


def test_help_and_usage_errors_import_neither_psycopg_nor_argon2():
    """The database and hashing libraries load only for commands that use them."""
    import subprocess
    import sys

    probe = (
        "import sys, io, agent_identity_admin as t\n"
        "for argv in (['help'], ['schema'], ['rotate', '--slug', 'x'], ['create', '--workspace-public-id', "
        "'Ab12Cd34Ef56', '--slug', 'b', '--display-name', 'B', '--token-name', 't', '--scopes', 'cards:read']):\n"
        "    t.main(argv, io.StringIO(), io.StringIO())\n"
        "print(sorted(m for m in ('psycopg', 'argon2') if m in sys.modules))\n"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert completed.stdout == "[]\n", completed.stderr


def test_a_missing_dependency_says_what_to_install():
    """Run by a python3 without psycopg (as a pnpm script may be): one clear line, exit 1."""
    import subprocess
    import sys

    from tests.support import SCRIPT, cli_env

    completed = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), "list", "--workspace-public-id", "Ab12Cd34Ef56"],
        env=cli_env(UNREACHABLE, **ACTOR), capture_output=True, text=True, timeout=30)
    assert completed.returncode == 1
    assert completed.stderr == (
        f"agent-identity: error: psycopg is not installed for {sys.executable}: pip install "
        "'psycopg[binary]>=3.2' 'argon2-cffi>=23.1' (or run the installed agent-identity)\n")


@pytest.mark.parametrize("command", ["create", "rotate", "revoke", "verify", "doctor", "list"])
def test_command_help_flag_shows_the_same_examples(command):
    by_flag = offline(command, "--help")
    assert by_flag.code == 0
    assert by_flag.stdout == offline("help", command).stdout
    assert "example" in by_flag.stdout and f"agent-identity {command}" in by_flag.stdout.split("example")[1]


# --- mistakes named as they are (issue: fits the operator's habits) ---------------------


def test_an_unknown_option_is_named_before_a_missing_one_with_the_closest():
    result = offline("rotate", *WORKSPACE, "--slgu", "bot", "--dry-run")
    assert result.code == 2
    assert result.stderr == ('agent-identity: error: unknown option "--slgu" (did you mean --slug?) '
                             "(see `agent-identity rotate --help`)\n")


def test_an_unknown_option_as_json_is_one_object():
    result = offline("--json", "list", *WORKSPACE, "--limt=5")
    assert (result.code, result.json["error"]["kind"]) == (2, "usage")
    assert result.json["error"]["message"].startswith('unknown option "--limt" (did you mean --limit?)')


def test_an_unknown_command_gets_the_closest():
    result = offline("rotat", *WORKSPACE)
    assert result.code == 2
    assert result.stderr == ('agent-identity: error: unknown command "rotat" (did you mean rotate?) '
                             "(see `agent-identity --help`)\n")


def test_scope_options_and_commands_share_one_suggestion():
    import agent_identity_admin as tool

    assert tool.did_you_mean("cards:wirte", tool.SCOPES) == " (did you mean cards:write?)"
    assert tool.did_you_mean("--slgu", ["--slug", "--scopes"]) == " (did you mean --slug?)"
    assert tool.did_you_mean("zzz", ["rotate"]) == ""


@pytest.mark.parametrize("email", [" sam@example.com", "sam@example.com ", "\tsam@example.com"])
def test_an_email_with_surrounding_whitespace_is_refused_before_connecting(email):
    result = offline("list", *WORKSPACE, env={"AGENT_IDENTITY_ADMIN_EMAIL": email})
    assert result.code == 2
    if email.strip() != email and "\t" not in email:
        assert result.stderr == f'agent-identity: error: admin user email "{email}" has leading or trailing spaces\n'
    assert "cannot connect" not in result.stderr


@pytest.mark.parametrize("args, command", [
    (["--json", "--version"], "version"),
    (["--version", "--json"], "version"),
    (["--json", "--help"], "help"),
    (["list", "--help", "--json"], "help"),
])
def test_json_help_and_version_are_one_object(args, command):
    result = offline(*args)
    assert result.code == 0 and result.stderr == ""
    body = result.json
    assert (body["ok"], body["command"]) == (True, command)
    assert body["text"].startswith("agent-identity 0." if command == "version" else "usage: agent-identity")


@pytest.mark.parametrize("topic", [None, *tool.COMMANDS])  # every command
def test_help_fits_80_columns(topic):
    """What `help` and every `COMMAND --help` print, on an 80-column terminal or a pipe."""
    for env in ({**ACTOR, "COLUMNS": "80"}, ACTOR):
        for args in ((["help", topic] if topic else ["help"]), ([topic, "--help"] if topic else ["--help"])):
            result = offline(*args, env=env)
            assert result.code == 0
            too_long = [line for line in result.stdout.splitlines() if len(line) > 80]
            assert not too_long, too_long


# --- shell completion, driven in a real bash --------------------------------------

COMPLETE = """
source <(agent-identity completion bash)
for line in "$@"; do
    COMP_LINE="$line"; COMP_POINT=${#COMP_LINE}; COMPREPLY=()
    _agent_identity
    echo "${COMPREPLY[*]}"
done
"""


def test_bash_completion_completes_commands_options_and_values(tmp_path):
    import subprocess
    import sys

    shim = tmp_path / "agent-identity"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} {support.SCRIPT} \"$@\"\n")
    shim.chmod(0o755)
    lines = {
        "agent-identity rot": "rotate",
        "agent-identity rotate --gr": "--grace",
        "agent-identity list --status ": "active paused revoked",
        "agent-identity list --wid": "--wide",
        "agent-identity create --scopes boa": "boards:read boards:write",
        # bash's word starts after the last ':', so what comes back is the rest from there
        "agent-identity create --scopes boards:read,car": "read,cards:read read,cards:write",
        "agent-identity create --scopes boards:read,cards:w": "write",
        "agent-identity completion ": None,
        "agent-identity create --slug ": "",
        "agent-identity help rot": "rotate",
        "agent-identity audit --action identity.p": "identity.paused",
        "agent-identity audit --action acc": "access.denied",
    }
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    done = subprocess.run(["bash", "-c", COMPLETE, "complete", *lines], capture_output=True, text=True, env=env,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    got = dict(zip(lines, done.stdout.splitlines()))
    for line, expected in lines.items():
        if expected is not None:
            assert got[line] == expected, line
    assert {"bash", "zsh", "fish"} <= set(got["agent-identity completion "].split())
    token_file = subprocess.run(["bash", "-c", COMPLETE, "complete", "agent-identity rotate --token-file "],
                                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30)
    assert "agent-identity" in token_file.stdout.split(), "a PATH is completed from the folder"


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_completion_cover_every_command_and_option(shell):
    import agent_identity_admin as tool

    script = offline("completion", shell).stdout
    parser = tool.build_parser()
    for name, options in tool.completion_spec(parser).items():
        assert name in script
        for option in options:
            assert (option if shell == "zsh" else f"-l {option[2:]}") in script or not option.startswith("--")
    assert "active paused revoked" in script and "cards:write" in script
