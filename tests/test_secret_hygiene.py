"""No token and no database password in any table, audit metadata, stderr, JSON error,
or the command line of a running tool."""

import json

from psycopg.conninfo import make_conninfo

from tests import support

PASSWORD = "Db-Pa55word-Xyz-77"


def test_no_secret_leaks_anywhere(db, kan, cli, cli_dsn, database, operator, tmp_path):
    # The servers here trust local connections, so a password is carried but never needed:
    # it can only leak.
    dsn = make_conninfo(cli_dsn, password=PASSWORD)
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": operator.email}
    w = ["--workspace-public-id", operator.workspace["publicId"]]

    def run(*args, input=None, actor=env):
        return cli(*args, env=actor, dsn=dsn, input=input)

    issued, runs = [], []
    created = run("create", *w, "--slug", "hygiene", "--display-name", "H", "--token-name", "t",
                  "--scopes", "boards:read", "--confirm", "--json")
    issued.append(created.json["token"]["secret"])
    rotated = run("rotate", *w, "--slug", "hygiene", "--grace", "1h", "--confirm")
    issued.append(rotated.stdout.split("token: ")[1].split()[0])
    run("rotate", *w, "--slug", "hygiene", "--token-file", str(tmp_path / "t"), "--confirm")
    issued.append((tmp_path / "t").read_text().strip())
    outsider = kan.user()
    for args, kwargs in [
        (("verify", "--json"), {"input": issued[0]}),
        (("verify",), {"input": issued[2]}),
        (("verify", "--json"), {"input": issued[1][:-1]}),
        (("verify", "--json"), {"input": issued[0], "actor": {"AGENT_IDENTITY_ADMIN_EMAIL": outsider["email"]}}),
        (("verify", issued[1]), {}),
        (("inspect", *w, "--slug", "hygiene", "--events", "50"), {}),
        (("inspect", *w, "--slug", "hygiene", "--json"), {}),
        (("list", *w, "--json"), {}),
        (("rotate", *w, "--slug", "nobody", "--confirm", "--json"), {}),
        (("create", *w, "--slug", "hygiene", "--display-name", "H", "--token-name", "t", "--scopes", "boards:read",
          "--confirm", "--json"), {}),
        (("rotate", *w, "--slug", "hygiene", "--confirm", "--json"), {"actor": {"AGENT_IDENTITY_ADMIN_EMAIL": outsider["email"]}}),
        (("pause", *w, "--slug", "hygiene", "--json"), {}),
        (("list", "--workspace-public-id", "x"), {}),
    ]:
        runs.append(run(*args, **kwargs))
    runs.append(cli("list", *w, "--json", env=env, dsn=make_conninfo(dsn, port="9", host="127.0.0.1")))
    runs.append(cli("list", *w, env=env, dsn=make_conninfo(dsn, port="9", host="127.0.0.1")))

    # A running tool, waiting on a lock: its command line and what it prints when it gives up.
    lock = support.HeldLock(database, operator.workspace["id"], "hygiene")
    try:
        process = support.start_cli(
            ["revoke", *w, "--slug", "hygiene", "--lock-timeout", "5", "--confirm", "--json"], dsn, env)
        support.waiting_backend(db)
        cmdline = open(f"/proc/{process.pid}/cmdline", "rb").read().decode()
        db.execute("""SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                      WHERE application_name = 'agent-identity' AND datname = current_database()""")
        stdout, stderr = process.communicate(timeout=30)
        runs.append(support.Run(["revoke"], process.returncode, stdout, stderr))
    finally:
        lock.release()

    assert len(issued) == 3 and all(token.startswith("kan_agent_") for token in issued)
    # ok is false for errors and for verify's "not valid" alike; errors carry an error object.
    errors_json = [run.stdout for run in runs if run.stdout.startswith('{"ok": false') and '"error": {' in run.stdout]
    assert len(errors_json) >= 5
    assert all(json.loads(text)["error"]["message"] for text in errors_json)
    places = {
        "every table, audit metadata included": support.database_text(db),
        "stderr": "\n".join(run.stderr for run in [created, rotated, *runs]),
        "JSON errors": "\n".join(errors_json),
        "inspect, list and verify output": "\n".join(run.stdout for run in runs),
        "the running tool's command line": cmdline,
    }
    for place, text in places.items():
        for token in issued:
            assert token not in text, f"a token in {place}"
            assert token.rsplit("_", 1)[1] not in text, f"a token's secret part in {place}"
        assert PASSWORD not in text, f"the database password in {place}"
    assert "revoke" in cmdline and runs[-1].code == 6
