"""Kan's tables are found the way Kan finds them, through the search_path, and the agent
tables go beside them; rows that row level security hides are said to be hidden."""

import secrets

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests import support


@pytest.fixture
def fresh(server_dsn):
    """An empty database of its own (dropped after), and its DSN."""
    name = f"agent_identity_test_{secrets.token_hex(6)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server_dsn, dbname=name)
    yield dsn
    support.drop_database(server_dsn, dsn)


def kan_in(dsn: str, schema: str) -> None:
    """Kan's tables in schema, and the agent tables beside them by `schema --db-schema`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        conn.execute(f'SET search_path = "{schema}"')
        conn.execute(support.KAN_SCHEMA.read_text())
        conn.execute(support.run_cli(["schema", "--db-schema", schema], None).stdout)


def checks(result) -> dict:
    return {c["name"]: c for c in result.json["checks"]}


def lifecycle_works(dsn: str, search_path: str) -> None:
    """An admin in that schema creates, lists and inspects an identity."""
    with psycopg.connect(dsn, autocommit=True, options=f"-c search_path={search_path}") as conn:
        workspace, admin = support.Kan(conn).managed_workspace()
    w = ["--workspace-public-id", workspace["publicId"], "--json"]
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}
    created = support.run_cli(["create", *w, "--slug", "pathed", "--display-name", "P", "--token-name", "t",
                               "--scopes", "boards:read", "--confirm"], dsn, env)
    assert created.code == 0, created.stdout + created.stderr
    assert support.run_cli(["list", *w], dsn, env).json["identities"][0]["slug"] == "pathed"
    assert support.run_cli(["inspect", *w, "--slug", "pathed"], dsn, env).code == 0
    doctor = support.run_cli(["doctor", *w], dsn, env)
    assert doctor.code == 0, doctor.stdout


def test_a_same_named_empty_schema_first_in_the_path_hides_nothing(fresh):
    """search_path "$user", public with a schema named after the role: Kan's tables are in public."""
    kan_in(fresh, "public")
    role = f"path_role_{secrets.token_hex(3)}"
    with psycopg.connect(fresh, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
        conn.execute(f'CREATE SCHEMA "{role}" AUTHORIZATION "{role}"')
    try:
        dsn = make_conninfo(fresh, user=role)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SHOW search_path").fetchone()[0] == '"$user", public'
        doctor = support.run_cli(["doctor", "--json"], dsn)
        assert doctor.code == 0, doctor.stdout
        assert checks(doctor)["Kan tables"]["detail"] == "6 present, in schema public"
        lifecycle_works(dsn, "public")
    finally:
        with psycopg.connect(fresh, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{role}"')
            conn.execute(f'DROP ROLE "{role}"')


def test_kan_in_a_schema_of_its_own_reached_through_the_url(fresh):
    kan_in(fresh, "kan_app")
    dsn = make_conninfo(fresh, options="-c search_path=kan_app")
    doctor = support.run_cli(["doctor", "--json"], dsn)
    assert doctor.code == 0, doctor.stdout
    assert checks(doctor)["Kan tables"]["detail"] == "6 present, in schema kan_app"
    assert checks(doctor)["agent tables"]["detail"] == "6 present, in schema kan_app, every column as expected"
    lifecycle_works(dsn, "kan_app")
    with psycopg.connect(fresh) as conn:
        assert conn.execute("SELECT to_regclass('public.agent_identity')").fetchone()[0] is None


def test_doctor_fails_when_the_agent_tables_are_apart_from_kans(fresh):
    """The old `schema` put them in the applying role's first schema: doctor says so, with the fix."""
    kan_in(fresh, "kan_app")
    with psycopg.connect(fresh, autocommit=True) as conn:
        for table in ("agent_identity", "agent_token", "agent_audit_event"):
            conn.execute(f"ALTER TABLE kan_app.{table} SET SCHEMA public")
    dsn = make_conninfo(fresh, options="-c search_path=kan_app,public")
    doctor = support.run_cli(["doctor", "--json"], dsn)
    assert doctor.code == 6
    agent = checks(doctor)["agent tables"]
    assert agent["ok"] is False
    assert agent["detail"] == ("Kan's workspace is in schema kan_app, but agent_audit_event is in schema public, "
                               "agent_identity is in schema public, agent_token is in schema public")
    assert agent["fix"].startswith("apply `agent-identity schema --db-schema kan_app` as the owner of Kan's tables")


def test_a_role_that_row_level_security_blinds_is_told_so(database, kan, cli):
    """Grants but no policy: every row reads as absent; the not-found says why it may be."""
    workspace, admin = kan.managed_workspace()
    role, password = f"blind_{secrets.token_hex(3)}", secrets.token_hex(8)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
        conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
        conn.execute('ALTER TABLE workspace ENABLE ROW LEVEL SECURITY')
    try:
        result = cli("list", "--workspace-public-id", workspace["publicId"],
                     env={"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]},
                     dsn=make_conninfo(database, user=role, password=password))
        assert result.code == 3
        assert result.stderr == (f"agent-identity: error: workspace {workspace['publicId']} not found (row level "
                                 f"security may hide rows of workspace from role {role}: run agent-identity doctor)\n")
        # The owner, whom row level security does not bind, gets no such hint for a real absence.
        absent = cli("list", "--workspace-public-id", "Zz99Zz99Zz99", env={"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]},
                     dsn=database)
        assert absent.stderr == "agent-identity: error: workspace Zz99Zz99Zz99 not found\n"
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')
