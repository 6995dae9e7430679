"""Issue #20: what the tables' owner (Kan's migration role, not a superuser) and the
least-privilege role can do to the agent tables by hand, and what the database refuses,
doctor names and audit verify reports. Every database here is made and owned by a
LOGIN role that is not a superuser, as Kan runs; the superuser only creates it, reads
it, and (where a test says so) tampers past every trigger."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from datetime import datetime

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

import agent_identity_admin as tool
from tests import support

# --- where these tests run: databases a non-superuser owns --------------------------------


@dataclasses.dataclass(frozen=True)
class Role:
    name: str
    password: str


@dataclasses.dataclass(frozen=True)
class Place:
    """A database of these tests' own, made by the owner role, and a Kan workspace in it
    with its admin: the CLI runs as the owner unless told another DSN."""

    superuser: str  # the superuser's DSN in this database: reads, snapshots, tampering past every trigger
    owner: str  # the DSN of the role that owns every table and function here (not a superuser)
    workspace: dict
    admin: str

    def cli(self, *args: str, dsn: str | None = None, actor: str | None = None, input: str | None = None,
            env: dict | None = None) -> support.Run:
        environment = {"AGENT_IDENTITY_ADMIN_EMAIL": self.admin if actor is None else actor, **(env or {})}
        return support.run_cli(list(args), dsn or self.owner, environment, input=input)

    def __call__(self, command: str, *args: str, **options) -> support.Run:
        """A command in this workspace: place("pause", "--slug", "x", "--confirm")."""
        return self.cli(*command.split(), "--workspace-public-id", self.workspace["publicId"], *args, **options)

    def create(self, slug: str, *args: str, dsn: str | None = None) -> dict:
        run = self("create", "--slug", slug, "--display-name", f"Agent {slug}", "--token-name", "primary",
                   "--scopes", "boards:read", "--confirm", "--json", *args, dsn=dsn)
        assert run.code == 0, run.stderr + run.stdout
        return run.json

    def connect(self, dsn: str | None = None, **options) -> psycopg.Connection:
        return psycopg.connect(dsn or self.superuser, autocommit=True, **options)

    def another_workspace(self) -> Place:
        """The same database, a new workspace and admin (made by the owner, as Kan would)."""
        with self.connect(self.owner) as conn:
            workspace, admin = support.Kan(conn).managed_workspace()
        return dataclasses.replace(self, workspace=workspace, admin=admin["email"])

    def outsider(self) -> str:
        """The email of a Kan user who is no member of the workspace."""
        with self.connect(self.owner) as conn:
            return support.Kan(conn).user()["email"]

    def events(self) -> list[dict]:
        with self.connect() as conn:
            return conn.cursor(row_factory=psycopg.rows.dict_row).execute(
                """SELECT "publicId", "sequence", action, "identityPublicId", "identitySlug", "agentIdentityId",
                          "agentTokenId", "actorUserId", "actorEmail", metadata, "createdAt", "hash"
                   FROM agent_audit_event WHERE "workspaceId" = %s ORDER BY "sequence" NULLS LAST, "id" """,
                (self.workspace["id"],)).fetchall()

    def last_event(self) -> dict:
        return self.events()[-1]

    def snapshot(self) -> dict:
        with self.connect() as conn:
            return support.snapshot(conn)


@pytest.fixture(scope="module")
def owner(server_dsn):
    """A LOGIN role that is not a superuser: it owns the databases below and everything in them."""
    role = Role(f"agent_identity_owner_{secrets.token_hex(4)}", secrets.token_hex(12))
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD {}")
                     .format(sql.Identifier(role.name), sql.Literal(role.password)))
    try:
        yield role
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role.name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role.name)))


@contextlib.contextmanager
def owned_database(server_dsn: str, owner: Role, *, kan: bool = True, agent_schema: str | None = None):
    """A new database the owner role owns (the superuser only creates it); as that role,
    Kan's tables and then the agent schema (this version's `schema`, unless given)."""
    name = f"agent_identity_detection_{secrets.token_hex(5)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(owner.name)))
    superuser = make_conninfo(server_dsn, dbname=name)
    try:
        owner_dsn = make_conninfo(superuser, user=owner.name, password=owner.password)
        workspace = admin = None
        if kan:
            with psycopg.connect(owner_dsn, autocommit=True) as conn:
                conn.execute(support.KAN_SCHEMA.read_text())
                conn.execute(support.run_cli(["schema"], None).stdout if agent_schema is None else agent_schema)
                workspace, admin = support.Kan(conn).managed_workspace()
        yield Place(superuser, owner_dsn, workspace, admin and admin["email"])
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def shared(server_dsn, owner):
    """This module's database: for tests that leave every chain intact and as its tables say."""
    with owned_database(server_dsn, owner) as place:
        yield place


@pytest.fixture(scope="module")
def shared_least(shared):
    """The least-privilege role of docs/security.md in the module's database (its DSN)."""
    with support.least_privilege_role(shared.superuser) as dsn:
        yield dsn


@pytest.fixture
def place(server_dsn, owner):
    """A database of the test's own, for tests that break a chain or a safeguard."""
    with owned_database(server_dsn, owner) as place:
        yield place


def verified(place: Place, *args: str, dsn: str | None = None) -> tuple[support.Run, dict]:
    run = place("audit verify", "--json", *args, dsn=dsn)
    assert run.stdout, run.stderr
    [report] = run.json["workspaces"]
    return run, report


def doctor(dsn: str) -> tuple[support.Run, dict[str, str]]:
    """doctor's run, and the checks that failed: name -> detail."""
    run = support.run_cli(["doctor", "--json"], dsn)
    assert run.stdout, run.stderr
    return run, {check["name"]: check["detail"] for check in run.json["checks"] if not check["ok"]}


def breaks(report: dict) -> list[tuple]:
    return [(b["kind"], b["sequence"]) for b in report["breaks"]]


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_the_tables_and_functions_belong_to_a_role_that_is_not_a_superuser(shared, owner):
    """The setup itself: the owner role made every agent table and function, and is no superuser."""
    with shared.connect(shared.owner) as conn:
        assert conn.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user").fetchone() \
            == (False, False)
    with shared.connect() as conn:
        tables = dict(conn.execute("SELECT tablename, tableowner FROM pg_tables WHERE tablename LIKE 'agent\\_%'"))
        functions = {row[0] for row in conn.execute(
            "SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE proname = ANY(%s)",
            ([f.name for f in tool.SCHEMA_FUNCTIONS],))}
    assert set(tables) == set(tool.AGENT_TABLES) and set(tables.values()) == {owner.name}
    assert functions == {owner.name}


# --- 1: the owner switches the triggers off, un-ends something, and on again ------------------


def unend(conn: psycopg.Connection, *, token: str | None = None, identity: str | None = None) -> None:
    """What the tables' owner does to make the un-ending stick: every user trigger of the two
    tables off (the deferred audit checks too, or they refuse at commit), the rows set
    back, the triggers on again, in one transaction."""
    with conn.transaction():
        for table in ("agent_token", "agent_identity"):
            conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
        if token:
            conn.execute("""UPDATE agent_token SET "revokedAt" = NULL, "revokedBy" = NULL WHERE "publicId" = %s""",
                         (token,))
        if identity:
            conn.execute("""UPDATE agent_identity SET status = 'active', "revokedAt" = NULL, "pausedAt" = NULL
                            WHERE "publicId" = %s""", (identity,))
        for table in ("agent_token", "agent_identity"):
            conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")


@pytest.mark.parametrize("ended", ["a revoked token", "a revoked identity and its token", "a paused identity"])
def test_an_owner_who_switches_triggers_off_to_unend_is_caught(place, ended):
    """verify may say valid, but doctor fails "audit chains" and audit verify names the token and the event."""
    made = place.create("bot")
    token, identity = made["token"]["publicId"], made["identity"]["publicId"]
    command = {"a revoked token": ["revoke", "--slug", "bot", "--token", token],
               "a revoked identity and its token": ["revoke", "--slug", "bot"],
               "a paused identity": ["pause", "--slug", "bot"]}[ended]
    assert place(*command, "--confirm").code == 0
    event = place.last_event()
    # Switching only the one safeguard off is not enough: the deferred audit check refuses at commit.
    if ended != "a paused identity":
        naive = psycopg.connect(place.owner)
        try:
            naive.execute("ALTER TABLE agent_token DISABLE TRIGGER agent_token_only_ends")
            naive.execute("""UPDATE agent_token SET "revokedAt" = NULL WHERE "publicId" = %s""", (token,))
            with pytest.raises(errors.CheckViolation, match="without its audit event"):
                naive.commit()
        finally:
            naive.close()
    with place.connect(place.owner) as conn:
        unend(conn, token=token if ended != "a paused identity" else None,
              identity=identity if ended != "a revoked token" else None)
    checked = place.cli("verify", "--json", input=made["token"]["secret"] + "\n")
    assert (checked.code, checked.json["valid"]) == (0, True), "the tables now say the token is good"

    run, failed = doctor(place.owner)
    assert run.code == 6
    assert set(failed) == {"audit chains"}, failed
    assert f"at {event['sequence']} (mismatch" in failed["audit chains"]
    run, report = verified(place)
    assert run.code == 10 and report["intact"] is False
    expected = {
        "a revoked token": [f"token {token} is not revoked, but event {event['sequence']} revoked it"],
        "a revoked identity and its token": [
            f"agent identity {identity} is active, but event {event['sequence']} made it revoked",
            f"token {token} is not revoked, but event {event['sequence']} revoked it"],
        "a paused identity": [f"agent identity {identity} is active, but event {event['sequence']} made it paused"],
    }[ended]
    assert [b["message"] for b in report["breaks"]] == expected
    assert {(b["kind"], b["sequence"], b["eventPublicId"]) for b in report["breaks"]} == \
        {("mismatch", event["sequence"], event["publicId"])}


def test_0_3_0_saw_nothing_of_the_same_unrevoke(server_dsn):
    """The premise: 0.3.0's doctor and audit verify both passed a database whose revoked token was live again."""
    dsn = support.released_database(server_dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            workspace, admin = support.Kan(conn).managed_workspace()
        env = {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}
        w = ["--workspace-public-id", workspace["publicId"]]
        made = support.run_released(["create", *w, "--slug", "bot", "--display-name", "B", "--token-name", "t",
                                     "--scopes", "boards:read", "--confirm", "--json"], dsn, env)
        assert support.run_released(["revoke", *w, "--slug", "bot", "--confirm"], dsn, env).code == 0
        with psycopg.connect(dsn, autocommit=True) as conn:
            unend(conn, token=made.json["token"]["publicId"], identity=made.json["identity"]["publicId"])
        assert support.run_released(["doctor"], dsn).code == 0
        assert support.run_released(["audit", "verify", *w], dsn, env).code == 0
    finally:
        support.drop_database(server_dsn, dsn)


def test_an_unrevoke_made_to_agree_with_forged_events_is_still_caught(place):
    """Un-revoked, then forged events (every trigger on) that say so: each is an impossible break; doctor fails."""
    made = place.create("bot")
    token, identity = made["token"], made["identity"]["publicId"]
    assert place("revoke", "--slug", "bot", "--confirm").code == 0
    forged = [tool.new_public_id(), tool.new_public_id()]
    with place.connect(place.owner) as conn:
        unend(conn, token=token["publicId"], identity=identity)
        identity_id, token_id = conn.execute(
            """SELECT i."id", t."id" FROM agent_identity i JOIN agent_token t ON t."agentIdentityId" = i."id"
               WHERE t."publicId" = %s""", (token["publicId"],)).fetchone()
        for public_id, action, token_ref, metadata in (
                (forged[0], "identity.resumed", None, {"previousStatus": "paused", "newStatus": "active"}),
                (forged[1], "identity.token_rotated", token_id,
                 {"tokenPublicId": token["publicId"], "expiresAt": token["expiresAt"], "revokedTokenPublicIds": []})):
            conn.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", "agentIdentityId", "agentTokenId",
                                                           action, "actorEmail", metadata)
                            VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                         (public_id, place.workspace["id"], identity_id, token_ref, action, place.admin,
                          json.dumps(metadata)))
    assert place.cli("verify", "--json", input=token["secret"] + "\n").json["valid"] is True
    run, report = verified(place)
    assert run.code == 10 and report["intact"] is False
    assert [(b["kind"], b["sequence"], b["eventPublicId"], b["message"]) for b in report["breaks"]] == [
        ("impossible", 3, forged[0], f"event 3 changes agent identity {identity}, which event 2 revoked"),
        ("impossible", 4, forged[1], f"event 4 issues token {token['publicId']} again")], report["breaks"]
    run, failed = doctor(place.owner)
    assert run.code == 6 and set(failed) == {"audit chains"}, failed
    assert "at 3 (impossible, and 1 more)" in failed["audit chains"], failed


@pytest.mark.parametrize("change", ["scopes widened", "moved to another identity"])
def test_a_token_changed_where_the_chain_does_not_look_is_caught(place, change):
    """The owner's change of a token's scopes or identity is refused; made past the triggers, it is a mismatch break."""
    made = place.create("bot")
    place.create("idle")
    assert place("pause", "--slug", "idle", "--confirm").code == 0  # its token is useless while paused
    idle = place.events()[1]["metadata"]["tokenPublicId"]
    if change == "scopes widened":
        token, statement = made["token"]["publicId"], """UPDATE agent_token SET scopes = %s WHERE "publicId" = %s"""
        params = (list(tool.SCOPES), token)
    else:
        token, statement = idle, """UPDATE agent_token SET "agentIdentityId" = (SELECT "id" FROM agent_identity
                                                                             WHERE "publicId" = %s)
                                    WHERE "publicId" = %s"""
        params = (made["identity"]["publicId"], idle)
    before = place.snapshot()
    with place.connect(place.owner) as conn:  # every trigger on
        with pytest.raises(errors.CheckViolation) as refused:
            conn.execute(statement, params)
        assert refused.value.diag.message_primary == \
            f"token {token}: only its end may change (its revocation, an earlier expiry)"
    assert place.snapshot() == before
    with place.connect() as conn:
        support.outside_the_tool(conn, statement, params)
    run, report = verified(place)
    assert run.code == 10
    issued = next(e for e in place.events() if e["metadata"].get("tokenPublicId") == token)
    field = "scopes" if change == "scopes widened" else "identity"
    assert [(b["kind"], b["sequence"], b["eventPublicId"], b["message"]) for b in report["breaks"]] == [
        ("mismatch", issued["sequence"], issued["publicId"],
         f"token {token}'s {field} is not the one event {issued['sequence']} issued it with")], report
    run, failed = doctor(place.owner)
    assert run.code == 6 and set(failed) == {"audit chains"}, failed


# --- 2: the owner rewrites a safeguard: doctor's "safeguards" check names it -----------------

SAFEGUARD_ATTACKS = {
    "a safeguard's body rewritten": (
        """CREATE OR REPLACE FUNCTION agent_token_only_ends() RETURNS trigger LANGUAGE plpgsql VOLATILE
           SET search_path = pg_catalog, pg_temp AS $$BEGIN RETURN NEW; END$$""",
        ["function agent_token_only_ends", "body"]),
    "its trigger recreated WHEN (false)": (
        """CREATE OR REPLACE TRIGGER agent_token_only_ends BEFORE UPDATE ON agent_token
           FOR EACH ROW WHEN (false) EXECUTE FUNCTION agent_token_only_ends()""",
        ["trigger agent_token_only_ends", "conditional"]),
    "a trigger set to fire only on replicas": (
        "ALTER TABLE agent_identity ENABLE REPLICA TRIGGER agent_identity_revocation_is_final",
        ["trigger agent_identity_revocation_is_final", "does not fire"]),
    "an extra BEFORE INSERT trigger that rewrites actorEmail": (
        """CREATE FUNCTION blame() RETURNS trigger LANGUAGE plpgsql AS
               $$BEGIN NEW."actorEmail" := 'someone-else@example.com'; RETURN NEW; END$$;
           CREATE TRIGGER aaa_blame BEFORE INSERT ON agent_audit_event FOR EACH ROW EXECUTE FUNCTION blame()""",
        ["trigger aaa_blame on agent_audit_event", "extra"]),
    "a rule that drops refusals": (
        """CREATE RULE drop_denials AS ON INSERT TO agent_audit_event WHERE NEW.action = 'access.denied'
           DO INSTEAD NOTHING""",
        ["rule drop_denials on agent_audit_event", "extra"]),
    "a permissive policy of another shape": (
        """CREATE POLICY peek ON agent_token FOR SELECT TO PUBLIC USING ("revokedAt" IS NULL)""",
        ["policy peek on agent_token", "extra"]),
    "a restrictive policy": (
        """CREATE POLICY hide_denials ON agent_audit_event AS RESTRICTIVE FOR SELECT TO PUBLIC
           USING (action <> 'access.denied')""",
        ["policy hide_denials on agent_audit_event", "extra"]),
    "row level security off": (
        "ALTER TABLE agent_token DISABLE ROW LEVEL SECURITY",
        ["row level security on agent_token", "off"]),
    "SECURITY DEFINER removed": (
        "ALTER FUNCTION agent_audit_event_chain() SECURITY INVOKER",
        ["function agent_audit_event_chain", "definer"]),
    "a search_path reset": (
        "ALTER FUNCTION agent_lock_workspace(bigint) RESET search_path",
        ["function agent_lock_workspace", "config"]),
    "an extra overload of agent_audit_field": (
        """CREATE FUNCTION agent_audit_field(value varchar) RETURNS text LANGUAGE sql IMMUTABLE AS $$SELECT '-,'$$""",
        ["function agent_audit_field", "overload"]),
}


@pytest.mark.parametrize("attack", list(SAFEGUARD_ATTACKS))
def test_a_rewritten_safeguard_fails_doctor_naming_it(place, attack):
    """Each rewrite by the tables' owner fails doctor's "safeguards" check (exit 6), and only it, naming the object."""
    statement, named = SAFEGUARD_ATTACKS[attack]
    assert doctor(place.owner)[0].code == 0
    with place.connect(place.owner) as conn:
        conn.execute(statement)
    run, failed = doctor(place.owner)
    assert run.code == 6
    assert set(failed) == {"safeguards"}, failed
    assert all(words in failed["safeguards"] for words in named), failed["safeguards"]


def test_a_blaming_trigger_keeps_the_chain_intact_and_only_doctor_sees_it(place):
    """aaa_blame fires before the chain's trigger: the rewritten actor is hashed in; only doctor sees it."""
    place.create("bot")
    with place.connect(place.owner) as conn:
        conn.execute(SAFEGUARD_ATTACKS["an extra BEFORE INSERT trigger that rewrites actorEmail"][0])
    assert place("pause", "--slug", "bot", "--confirm").code == 0
    assert place.last_event()["actorEmail"] == "someone-else@example.com"
    run, report = verified(place)
    assert (run.code, report["intact"], report["events"]) == (0, True, 2)
    run, failed = doctor(place.owner)
    assert run.code == 6 and set(failed) == {"safeguards"} and "aaa_blame" in failed["safeguards"]


def test_a_safeguard_function_made_strict_fails_doctor_naming_it(place):
    """ALTER FUNCTION agent_audit_field(text) STRICT fails doctor's safeguards naming the function, before a write."""
    with place.connect(place.owner) as conn:
        conn.execute("ALTER FUNCTION agent_audit_field(text) STRICT")
    run, failed = doctor(place.owner)
    assert run.code == 6 and failed == {"safeguards": "function agent_audit_field differs (strict)"}, failed


def test_0_3_0_doctor_passed_rewritten_safeguards(server_dsn):
    """The premise: 0.3.0's doctor checked only that its triggers were enabled."""
    dsn = support.released_database(server_dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for attack in ("a safeguard's body rewritten", "its trigger recreated WHEN (false)",
                           "a rule that drops refusals", "row level security off",
                           "an extra BEFORE INSERT trigger that rewrites actorEmail"):
                conn.execute(SAFEGUARD_ATTACKS[attack][0].replace("SET search_path = pg_catalog, pg_temp", ""))
        assert support.run_released(["doctor"], dsn).code == 0
    finally:
        support.drop_database(server_dsn, dsn)


def test_doctor_is_green_on_a_database_schema_made(place):
    """The safeguards as schema makes them pass, for the owner and for the documented least-privilege role."""
    place.create("bot")
    run, failed = doctor(place.owner)
    assert (run.code, failed) == (0, {})
    with support.least_privilege_role(place.superuser) as least:
        run, failed = doctor(least)
        assert (run.code, failed) == (0, {})


def test_doctor_is_green_after_upgrading_what_0_3_0_wrote(server_dsn, owner):
    """0.3.0's schema and events, by the owner role; this schema applied over them: doctor and audit verify pass."""
    old_schema = support.run_released(["schema"], None).stdout
    with owned_database(server_dsn, owner, agent_schema=old_schema) as place:
        def old(*args: str, actor: str | None = None) -> support.Run:
            return support.run_released([*args, "--workspace-public-id", place.workspace["publicId"]], place.owner,
                                        {"AGENT_IDENTITY_ADMIN_EMAIL": actor or place.admin})
        for slug in ("kept", "rotated", "paused", "revoked"):
            assert old("create", "--slug", slug, "--display-name", "O", "--token-name", "t", "--scopes",
                       "boards:read", "--confirm").code == 0
        assert old("rotate", "--slug", "rotated", "--grace", "1h", "--confirm").code == 0
        assert old("pause", "--slug", "paused", "--confirm").code == 0
        assert old("revoke", "--slug", "revoked", "--confirm").code == 0
        assert old("inspect", "--slug", "kept", actor=place.outsider()).code == 4
        with place.connect(place.owner) as conn:
            conn.execute(support.run_cli(["schema"], None).stdout)
        run, failed = doctor(place.owner)
        assert (run.code, failed) == (0, {})
        with support.least_privilege_role(place.superuser) as least:
            run, failed = doctor(least)
            assert (run.code, failed) == (0, {})
            assert place("pause", "--slug", "kept", "--confirm", dsn=least).code == 0
        run, report = verified(place)
        assert (run.code, report["intact"], report["events"]) == (0, True, 9)


# --- 3: events cannot be detached from what still exists ---------------------------------------


def test_the_owner_cannot_detach_events_but_kans_cascade_still_works(shared):
    """With every trigger on, the owner may not NULL an event's foreign keys; Kan's DELETE of the identity may."""
    place = shared.another_workspace()
    identity = place.create("detached")["identity"]["publicId"]
    assert place("pause", "--slug", "detached", "--confirm").code == 0
    before = place.events()
    with place.connect(place.owner) as conn:
        for column in ("agentIdentityId", "agentTokenId", "actorUserId"):
            with pytest.raises(errors.CheckViolation, match="append-only"):
                conn.execute(f"""UPDATE agent_audit_event SET "{column}" = NULL WHERE "identityPublicId" = %s
                                 AND "{column}" IS NOT NULL""", (identity,))
        assert place.events() == before
        conn.execute("""DELETE FROM agent_identity WHERE "publicId" = %s""", (identity,))  # Kan's cascade
    after = place.events()
    assert [(e["publicId"], e["agentIdentityId"], e["agentTokenId"], e["identityPublicId"], e["identitySlug"])
            for e in after] == [(e["publicId"], None, None, identity, "detached") for e in before]
    listed = place("audit", "--json")
    assert listed.code == 0
    assert [(e["action"], e["slug"], e["identityPublicId"]) for e in listed.json["events"]] == \
        [("identity.paused", "detached", identity), ("identity.created", "detached", identity)]
    run, report = verified(place)
    assert (run.code, report["intact"], report["events"]) == (0, True, 2)


def test_0_3_0_let_the_owner_detach_events_of_a_live_identity(server_dsn):
    """The premise: 0.3.0's append-only trigger let anyone set an event's foreign keys to NULL at any time."""
    dsn = support.released_database(server_dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            workspace, admin = support.Kan(conn).managed_workspace()
        assert support.run_released(["create", "--workspace-public-id", workspace["publicId"], "--slug", "bot",
                                     "--display-name", "B", "--token-name", "t", "--scopes", "boards:read",
                                     "--confirm"], dsn, {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}).code == 0
        with psycopg.connect(dsn, autocommit=True) as conn:
            detached = conn.execute("""UPDATE agent_audit_event SET "agentIdentityId" = NULL, "agentTokenId" = NULL
                                       WHERE "agentIdentityId" IS NOT NULL""").rowcount
            assert detached == 1 and conn.execute("SELECT count(*) FROM agent_identity").fetchone() == (1,)
    finally:
        support.drop_database(server_dsn, dsn)


# --- 4: no change without its event, for the least-privilege role writing SQL by hand ------------


def hand_targets(place: Place) -> dict:
    """An active identity with a token that expires, and a paused one: their ids."""
    place.create("on", "--expires-in", "30d")
    place.create("off")
    assert place("pause", "--slug", "off", "--confirm").code == 0
    with place.connect() as conn:
        return dict(conn.execute("""SELECT i.slug, i."id" FROM agent_identity i WHERE i."workspaceId" = %s""",
                                 (place.workspace["id"],)).fetchall()) | {
            "token": conn.execute("""SELECT t."id" FROM agent_token t JOIN agent_identity i
                                     ON i."id" = t."agentIdentityId" WHERE i."workspaceId" = %s AND i.slug = 'on'""",
                                  (place.workspace["id"],)).fetchone()[0]}


def plant(conn: psycopg.Connection, place: Place, slug: str) -> tuple[int, int, str]:
    """An identity and a token whose secret the writer chose: (identity id, token id, token)."""
    token_public_id = tool.new_public_id()
    token = tool.new_token(token_public_id)
    identity_id = conn.execute("""INSERT INTO agent_identity ("publicId", "workspaceId", slug, "displayName")
                                  VALUES (%s, %s, %s, 'Planted') RETURNING "id" """,
                               (tool.new_public_id(), place.workspace["id"], slug)).fetchone()[0]
    token_id = conn.execute("""INSERT INTO agent_token ("publicId", "agentIdentityId", name, "tokenHash", scopes)
                               VALUES (%s, %s, 'planted', %s, %s) RETURNING "id" """,
                            (token_public_id, identity_id, tool.hash_token(token), list(tool.SCOPES))).fetchone()[0]
    return identity_id, token_id, token


HAND_CHANGES = {
    "an identity and its token inserted": lambda conn, place, ids: plant(conn, place, "planted"),
    "a paused identity made active": lambda conn, place, ids: conn.execute(
        """UPDATE agent_identity SET status = 'active', "pausedAt" = NULL WHERE "id" = %s""", (ids["off"],)),
    "a token revoked": lambda conn, place, ids: conn.execute(
        """UPDATE agent_token SET "revokedAt" = timezone('utc', now()) WHERE "id" = %s""", (ids["token"],)),
    "an expiry moved earlier": lambda conn, place, ids: conn.execute(
        """UPDATE agent_token SET "expiresAt" = "expiresAt" - interval '1 day' WHERE "id" = %s""", (ids["token"],)),
}


@pytest.mark.parametrize("change", list(HAND_CHANGES))
def test_a_hand_written_change_without_its_event_is_refused_at_commit(shared, shared_least, change):
    """The statement passes; COMMIT raises CheckViolation, and nothing is written."""
    place = shared.another_workspace()
    ids = hand_targets(place)
    before = place.snapshot()
    with psycopg.connect(shared_least) as conn:
        HAND_CHANGES[change](conn, place, ids)
        with pytest.raises(errors.CheckViolation, match="without its audit event"):
            conn.commit()
    assert place.snapshot() == before


def test_0_3_0_took_an_identity_and_token_with_no_event(server_dsn):
    """The premise: 0.3.0 had no check at commit, for any role."""
    dsn = support.released_database(server_dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            workspace, _ = support.Kan(conn).managed_workspace()
            place = Place(dsn, dsn, workspace, "")
            with conn.transaction():
                plant(conn, place, "planted")
            assert conn.execute("SELECT count(*) FROM agent_audit_event").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM agent_token").fetchone() == (1,)
    finally:
        support.drop_database(server_dsn, dsn)


def test_a_hand_written_change_with_its_event_is_accepted_and_the_chain_agrees(shared, shared_least):
    """The least-privilege role's resume and create by hand, each with its event: accepted, the chain intact."""
    place = shared.another_workspace()
    ids = hand_targets(place)
    with psycopg.connect(shared_least) as conn:
        conn.execute("""UPDATE agent_identity SET status = 'active', "pausedAt" = NULL WHERE "id" = %s""",
                     (ids["off"],))
        conn.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", "agentIdentityId", action,
                                                       "actorEmail", metadata)
                        VALUES (%s, %s, %s, 'identity.resumed', %s, %s)""",
                     (tool.new_public_id(), place.workspace["id"], ids["off"], place.admin,
                      json.dumps({"previousStatus": "paused", "newStatus": "active"})))
        conn.commit()
        identity_id, token_id, token = plant(conn, place, "by-hand")
        conn.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", "agentIdentityId", "agentTokenId",
                                                       action, "actorEmail", metadata)
                        VALUES (%s, %s, %s, %s, 'identity.created', %s, %s)""",
                     (tool.new_public_id(), place.workspace["id"], identity_id, token_id, place.admin,
                      json.dumps({"tokenPublicId": tool.parse_token(token)[0], "expiresAt": None,
                                  "revokedTokenPublicIds": []})))
        conn.commit()
    listed = {i["slug"]: i["status"] for i in place("list", "--json").json["identities"]}
    assert listed == {"on": "active", "off": "active", "by-hand": "active"}
    run, report = verified(place)
    assert (run.code, report["intact"], report["events"]) == (0, True, 5), report["breaks"]


# --- 5: audit verify reports every break, and only what it checked --------------------------------


def six_events(place: Place) -> list[dict]:
    """create x, y, z; pause x; resume x; a refused inspect: six events, the last changing nothing."""
    for slug in ("x", "y", "z"):
        place.create(slug)
    assert place("pause", "--slug", "x", "--confirm").code == 0
    assert place("resume", "--slug", "x", "--confirm").code == 0
    assert place("inspect", "--slug", "x", actor=place.outsider()).code == 4
    events = place.events()
    assert [e["sequence"] for e in events] == [1, 2, 3, 4, 5, 6] and events[-1]["action"] == "access.denied"
    return events


def tamper(place: Place, statement: str) -> None:
    with place.connect() as conn:
        support.outside_the_tool(conn, statement.replace("{w}", str(int(place.workspace["id"]))))


CHANGE_2 = """UPDATE agent_audit_event SET reason = 'nothing to see' WHERE "workspaceId" = {w} AND "sequence" = 2"""


def test_a_change_and_a_gap_are_two_breaks_in_order(place):
    """Event 2 changed and events 4-5 deleted: changed at 2, then gap at 4; the text says what was checked."""
    events = six_events(place)
    tamper(place, CHANGE_2)
    tamper(place, """DELETE FROM agent_audit_event WHERE "workspaceId" = {w} AND "sequence" IN (4, 5)""")
    run, report = verified(place)
    assert run.code == 10
    assert breaks(report) == [("changed", 2), ("gap", 4)]
    assert [b["eventPublicId"] for b in report["breaks"]] == [events[1]["publicId"], events[5]["publicId"]]
    assert (report["events"], report["head"]) == (4, f"6:{events[5]['hash']}")
    text = place("audit verify")
    assert text.code == 10
    first, second, checked = text.stdout.splitlines()
    assert first.startswith("✗ ") and ": broken at 2 (changed): event 2 was changed" in first
    assert second.startswith("  and at 4 (gap): event 4 to 5 is missing")
    assert checked == f"  checked 4 events, head 6:{events[5]['hash']}"
    old = support.run_released(["audit", "verify", "--workspace-public-id", place.workspace["publicId"], "--json"],
                               place.owner, {"AGENT_IDENTITY_ADMIN_EMAIL": place.admin})
    [old_report] = old.json["workspaces"]
    assert (old.code, old_report["break"]["kind"], "breaks" in old_report) == (10, "changed", False), \
        "the premise: 0.3.0 stopped at the first break and never said there was a gap"


def test_a_pinned_head_is_judged_on_its_own(place):
    """A pin at 6 still matches when event 2 changed; cut the end, and both the change and head_mismatch show."""
    events = six_events(place)
    pin = f"6:{events[5]['hash']}"
    tamper(place, CHANGE_2)
    run, report = verified(place, "--expect-head", pin)
    assert run.code == 10 and breaks(report) == [("changed", 2)]
    tamper(place, """DELETE FROM agent_audit_event WHERE "workspaceId" = {w} AND "sequence" = 6""")
    run, report = verified(place, "--expect-head", pin)
    assert run.code == 10 and breaks(report) == [("changed", 2), ("head_mismatch", 6)]
    assert report["breaks"][1]["message"].startswith(f"the chain ends at 5, before the pinned head ({pin})")
    text = place("audit verify", "--expect-head", pin)
    assert text.stdout.splitlines()[-1] == f"  checked 5 events, head 5:{events[4]['hash']}"
    old = support.run_released(["audit", "verify", "--workspace-public-id", place.workspace["publicId"],
                                "--expect-head", pin, "--json"], place.owner,
                               {"AGENT_IDENTITY_ADMIN_EMAIL": place.admin})
    assert old.json["workspaces"][0]["break"]["kind"] == "changed" and "head_mismatch" not in old.stdout, \
        "the premise: 0.3.0 never got to the pinned head once an earlier event was changed"


def test_a_changed_time_hides_no_change_after_it(place):
    """Event 1's time moved past event 2's and event 2 rewritten: audit verify names event 2 too."""
    events = six_events(place)
    tamper(place, """UPDATE agent_audit_event SET "createdAt" = "createdAt" + interval '1 hour'
                     WHERE "workspaceId" = {w} AND "sequence" = 1""")
    tamper(place, """UPDATE agent_audit_event SET reason = 'nothing to see', "actorEmail" = 'someone@example.com'
                     WHERE "workspaceId" = {w} AND "sequence" = 2""")
    run, report = verified(place)
    assert run.code == 10
    assert [(b["kind"], b["sequence"], b["eventPublicId"]) for b in report["breaks"]] == [
        ("changed", 1, events[0]["publicId"]), ("changed", 2, events[1]["publicId"])], report["breaks"]


def test_events_of_the_years_999_and_9999_verify(place, node_bin):
    """Years 999 and 9999 hash alike in Python, SQL and TypeScript: no change; 9999, in the future, is backdated."""
    with place.connect(place.owner) as conn:
        support.restored_event(conn, place.workspace["id"], "Year0999Evnt", "identity.paused",
                               datetime(999, 1, 2, 3, 4, 5, 6), place.admin)
        support.restored_event(conn, place.workspace["id"], "Year9999Evnt", "identity.paused",
                               datetime(9999, 12, 31, 23, 59, 59, 999999), place.admin)
    stored = place.events()
    assert [(e["publicId"], e["sequence"], e["createdAt"]) for e in stored] == [
        ("Year0999Evnt", 1, datetime(999, 1, 2, 3, 4, 5, 6)),
        ("Year9999Evnt", 2, datetime(9999, 12, 31, 23, 59, 59, 999999))], "kept as restored: SQL's hash agreed"
    run, report = verified(place)
    assert (run.code, report["intact"], report["events"]) == (10, False, 2)
    assert [(b["kind"], b["sequence"], b["eventPublicId"], b["message"]) for b in report["breaks"]] == [
        ("backdated", 2, "Year9999Evnt", "event 2 is dated 9999-12-31T23:59:59.999999Z, after the time it was checked")
    ], "the 999 event, first in its chain, verifies; Python's hashes agree with both: no break of kind changed"
    assert report["head"] == f"2:{stored[1]['hash']}"
    typescript = subprocess.run([str(node_bin / "tsx"), str(support.SERVER / "verify-audit-chain.ts"),
                                 place.workspace["publicId"]], env=support.node_env(place.superuser),
                                capture_output=True, text=True, timeout=120)
    assert typescript.returncode == 0, typescript.stderr
    *lines, summary = [json.loads(line) for line in typescript.stdout.splitlines()]
    assert [(line["hash"], line["linked"]) for line in lines] == [(e["hash"], True) for e in stored]
    assert summary == {"intact": True, "events": 2, "head": report["head"]}
    old = support.run_released(["audit", "verify", "--workspace-public-id", place.workspace["publicId"], "--json"],
                               place.owner, {"AGENT_IDENTITY_ADMIN_EMAIL": place.admin})
    assert (old.code, old.json["workspaces"][0]["break"]["sequence"]) == (10, 1), \
        "the premise: 0.3.0 wrote year 999 as 999, where PostgreSQL writes 0999"


def test_chain_time_writes_four_digit_years():
    """chain_time pads the year as PostgreSQL's to_char does."""
    assert tool.chain_time(datetime(999, 1, 2)) == "0999-01-02T00:00:00.000000Z"
    assert tool.chain_time(datetime(9999, 12, 31, 23, 59, 59, 999999)) == "9999-12-31T23:59:59.999999Z"
    assert tool.chain_time(datetime(1, 1, 1)) == "0001-01-01T00:00:00.000000Z"


def test_an_event_whose_time_runs_backwards_is_a_break(place):
    """An owner's restored event dated before the one before it (out of audit --since's window) is a backdated break."""
    place.create("bot")
    with place.connect(place.owner) as conn:
        support.restored_event(conn, place.workspace["id"], "Backdated001", "identity.resumed",
                               datetime(2020, 1, 1), place.admin)
    recent = place("audit", "--since", "1d", "--json").json["events"]
    assert "Backdated001" not in [e["publicId"] for e in recent], "hidden from a reviewer's window"
    run, report = verified(place)
    assert run.code == 10 and report["intact"] is False
    assert [(b["kind"], b["sequence"], b["eventPublicId"], b["message"]) for b in report["breaks"]] == [
        ("backdated", 2, "Backdated001", "event 2 is dated 2020-01-01T00:00:00.000000Z, before the event before it")
    ], report["breaks"]
    run, failed = doctor(place.owner)
    assert run.code == 6 and set(failed) == {"audit chains"} and "at 2 (backdated)" in failed["audit chains"], failed


# --- 6: a silently dropped audit row ---------------------------------------------------------------

DROP_EVERY_EVENT = """
CREATE FUNCTION drop_it() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$;
CREATE TRIGGER aaa_drop BEFORE INSERT ON agent_audit_event FOR EACH ROW EXECUTE FUNCTION drop_it()
"""
DENIAL_DROPPERS = {
    "a trigger that returns NULL": DROP_EVERY_EVENT,
    "a rule: DO INSTEAD NOTHING": SAFEGUARD_ATTACKS["a rule that drops refusals"][0],
    "a rule that routes it to another table": """
        CREATE TABLE elsewhere (LIKE agent_audit_event);
        CREATE RULE elsewhere AS ON INSERT TO agent_audit_event DO INSTEAD
            INSERT INTO elsewhere SELECT NEW.* RETURNING elsewhere.*""",
    "a CHECK constraint": """ALTER TABLE agent_audit_event ADD CONSTRAINT no_denials
                              CHECK (action <> 'access.denied') NOT VALID""",
}


def x_and_paused_y(place: Place) -> str:
    """x active, y paused; x's token."""
    token = place.create("x")["token"]["publicId"]
    place.create("y")
    assert place("pause", "--slug", "y", "--confirm").code == 0
    return token


def test_a_change_whose_event_a_trigger_drops_is_exit_6_and_commits_nothing(place):
    """aaa_drop returns NULL before the chain's trigger: every change exits 6, one line, and writes nothing."""
    token = x_and_paused_y(place)
    with place.connect(place.owner) as conn:
        conn.execute(DROP_EVERY_EVENT)
    before = place.snapshot()
    with support.least_privilege_role(place.superuser) as least:
        for command in (["resume", "--all"], ["pause", "--slug", "x"], ["rotate", "--slug", "x"],
                        ["revoke", "--slug", "x", "--token", token], ["revoke", "--slug", "x"], ["revoke", "--all"],
                        ["create", "--slug", "z", "--display-name", "Z", "--token-name", "t", "--scopes",
                         "boards:read"]):
            run = place(*command, "--confirm", dsn=least)
            line = one_line(run.stderr)
            assert run.code == 6 and run.stdout == "", (command, run)
            assert line.startswith("agent-identity: error: the audit log took 0 of the "), line
            assert "nothing was committed" in line
        assert place.snapshot() == before


def test_0_3_0_met_a_dropped_event_with_an_internal_error(server_dsn):
    """The premise: 0.3.0's pause with aaa_drop in place was exit 1, 'internal error: TypeError'."""
    dsn = support.released_database(server_dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            workspace, admin = support.Kan(conn).managed_workspace()
        env = {"AGENT_IDENTITY_ADMIN_EMAIL": admin["email"]}
        w = ["--workspace-public-id", workspace["publicId"]]
        assert support.run_released(["create", *w, "--slug", "x", "--display-name", "X", "--token-name", "t",
                                     "--scopes", "boards:read", "--confirm"], dsn, env).code == 0
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(DROP_EVERY_EVENT)
        paused = support.run_released(["pause", *w, "--slug", "x", "--confirm"], dsn, env)
        assert paused.code == 1 and "internal error: TypeError" in paused.stderr
    finally:
        support.drop_database(server_dsn, dsn)


# Why the refusal's event is not in the audit log, as the refused actor is told it: the row
# was dropped (the tool looks for it), or the database refused the INSERT.
NOT_AUDITED = {
    "a trigger that returns NULL": "the audit log took 0 of the 1 events written to it: a trigger or rule on "
                                   "agent_audit_event drops rows, and nothing was committed; run `agent-identity "
                                   "doctor`",
    "a rule: DO INSTEAD NOTHING": 'this refusal could not be audited (cannot perform INSERT RETURNING on relation '
                                  '"agent_audit_event"): a trigger, rule or constraint on agent_audit_event is in the '
                                  'way; run `agent-identity doctor`',
    "a rule that routes it to another table": "the audit log took 0 of the 1 events written to it: a trigger or rule "
                                              "on agent_audit_event drops rows, and nothing was committed; run "
                                              "`agent-identity doctor`",
    "a CHECK constraint": 'this refusal could not be audited (new row for relation "agent_audit_event" violates '
                          'check constraint "no_denials"): a trigger, rule or constraint on agent_audit_event is in '
                          'the way; run `agent-identity doctor`',
}
# What doctor's safeguards check says of each.
DROPPER_NAMED = {"a trigger that returns NULL": "trigger aaa_drop on agent_audit_event",
                 "a rule: DO INSTEAD NOTHING": "rule drop_denials on agent_audit_event",
                 "a rule that routes it to another table": "rule elsewhere on agent_audit_event",
                 "a CHECK constraint": "no_denials"}


@pytest.mark.parametrize("dropper", list(DENIAL_DROPPERS))
def test_a_refusal_whose_audit_row_is_dropped_is_exit_6(place, dropper):
    """A refusal whose access.denied row never lands: exit 6 saying why, nothing written; doctor names the cause."""
    x_and_paused_y(place)
    with place.connect(place.owner) as conn:
        conn.execute(DENIAL_DROPPERS[dropper])
    outsider = place.outsider()
    before = place.snapshot()
    run = place("inspect", "--slug", "x", actor=outsider)
    line = one_line(run.stderr)
    assert run.code == 6, line
    assert line == (f'agent-identity: error: "{outsider}" is not an active member of workspace '
                    f'{place.workspace["publicId"]}; and {NOT_AUDITED[dropper]}'), line
    after = place.snapshot()
    after.pop("elsewhere", None), before.pop("elsewhere", None)
    assert after == before
    checked, failed = doctor(place.owner)
    assert checked.code == 6 and set(failed) == {"safeguards"}, failed
    assert DROPPER_NAMED[dropper] in failed["safeguards"], failed["safeguards"]


def test_with_a_rule_on_the_audit_table_a_change_commits_nothing(place):
    """Under the rule that drops refusals, every change fails in one line, no traceback, and writes nothing."""
    token = x_and_paused_y(place)
    with place.connect(place.owner) as conn:
        conn.execute(DENIAL_DROPPERS["a rule: DO INSTEAD NOTHING"])
    before = place.snapshot()
    for command in (["resume", "--all"], ["pause", "--slug", "x"], ["revoke", "--slug", "x", "--token", token],
                    ["create", "--slug", "z", "--display-name", "Z", "--token-name", "t", "--scopes", "boards:read"]):
        run = place(*command, "--confirm")
        one_line(run.stderr)
        assert run.code != 0 and run.stdout == "", (command, run)
    assert place.snapshot() == before


def test_with_a_rule_on_the_audit_table_a_change_is_exit_6_and_says_why(place):
    """A pause the rule refuses, told as what it is: exit 6 naming agent_audit_event and doctor; nothing written."""
    x_and_paused_y(place)
    with place.connect(place.owner) as conn:
        conn.execute(DENIAL_DROPPERS["a rule: DO INSTEAD NOTHING"])
    before = place.snapshot()
    run = place("pause", "--slug", "x", "--confirm")
    line = one_line(run.stderr)
    assert (run.code, run.stdout) == (6, ""), line
    assert line == ("agent-identity: error: the database refused the tool's statement (cannot perform INSERT "
                    'RETURNING on relation "agent_audit_event"): a rule, trigger or constraint on the agent tables '
                    "is in the way, and nothing was written; run `agent-identity doctor`"), line
    assert place.snapshot() == before


# --- 7: schema is one transaction; races; a signal mid-stream ---------------------------------------


def psql_without_stopping(dsn: str, script: str) -> subprocess.CompletedProcess:
    """psql as an operator might run it: no --single-transaction, no ON_ERROR_STOP."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is needed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run([psql, "-X", "-q", "-d", dsn, "-f", "-"], input=script, capture_output=True, text=True,
                          env=env, timeout=60)


@contextlib.contextmanager
def kan_not_owned(server_dsn: str, owner: Role):
    """A database the owner role owns, whose Kan tables the superuser made: the owner may
    reference them, and cannot index workspace_members."""
    with owned_database(server_dsn, owner, kan=False) as place:
        with place.connect() as conn:
            conn.execute(support.KAN_SCHEMA.read_text())
            conn.execute(sql.SQL("GRANT REFERENCES ON ALL TABLES IN SCHEMA public TO {}")
                         .format(sql.Identifier(owner.name)))
        yield place


def agent_objects(place: Place) -> tuple:
    with place.connect() as conn:
        return conn.execute("""SELECT to_regclass('public.agent_identity') IS NOT NULL,
                                      to_regtype('public.agent_identity_status') IS NOT NULL,
                                      (SELECT count(*) FROM pg_proc WHERE proname LIKE 'agent\\_%%')""").fetchone()


@pytest.mark.parametrize("failure", ["the owner of the tables is someone else", "a conflicting function"])
def test_schema_fed_to_psql_without_stopping_applies_nothing_when_a_statement_fails(server_dsn, owner, failure):
    """BEGIN first and COMMIT last: a statement that fails in the middle leaves nothing of the schema behind."""
    schema = support.run_cli(["schema"], None).stdout
    assert schema.split("\n\n")[1].startswith("BEGIN;") and schema.rstrip().endswith("COMMIT;")
    if failure == "a conflicting function":
        context = owned_database(server_dsn, owner, kan=False)
    else:
        context = kan_not_owned(server_dsn, owner)
    with context as place:
        if failure == "a conflicting function":
            with place.connect(place.owner) as conn:
                conn.execute(support.KAN_SCHEMA.read_text())
                conn.execute("""CREATE FUNCTION agent_token_stamp(token_public_id text) RETURNS integer
                                LANGUAGE sql AS $$SELECT 1$$""")
        applied = psql_without_stopping(place.owner, schema)
        assert applied.returncode == 0, "psql went on past the error"
        assert "current transaction is aborted" in applied.stderr, applied.stderr
        assert agent_objects(place) == (False, False, 1 if failure == "a conflicting function" else 0)


def test_0_3_0_schema_fed_to_psql_without_stopping_was_left_half_applied(server_dsn, owner):
    """The premise: 0.3.0's DDL had no BEGIN, so psql without --single-transaction kept what came before the failure."""
    with kan_not_owned(server_dsn, owner) as place:
        applied = psql_without_stopping(place.owner, support.run_released(["schema"], None).stdout)
        assert "must be owner of table workspace_members" in applied.stderr, applied.stderr
        assert agent_objects(place)[:2] == (True, True)


def waiting_for_the_turn(conn: psycopg.Connection, count: int, timeout: float = 20) -> None:
    """Until count of the tool's backends wait on a lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = conn.execute("""SELECT count(*) FROM pg_stat_activity WHERE application_name = 'agent-identity'
                                  AND wait_event_type = 'Lock' AND datname = current_database()""").fetchone()[0]
        if waiting >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{count} runs of the tool never waited for the workspace's turn")


def race(place: Place, dsn: str, runs: dict[str, list[str]], first: str) -> dict[str, support.Run]:
    """Hold the workspace's turn (as the superuser, in an open transaction), start the runs
    (first, then the other) each once the one before waits for it, then let go."""
    order = [first, *(name for name in runs if name != first)]
    env = {"AGENT_IDENTITY_ADMIN_EMAIL": place.admin}
    processes = {}
    with place.connect() as watcher, psycopg.connect(place.superuser) as holder:
        holder.execute("SELECT agent_lock_workspace(%s)", (place.workspace["id"],))
        try:
            for number, name in enumerate(order, 1):
                processes[name] = support.start_cli(runs[name], dsn, env)
                waiting_for_the_turn(watcher, number)
        finally:
            holder.rollback()
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=60)
        results[name] = support.Run(runs[name], process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("first", ["create", "revoke"])
def test_revoke_all_racing_a_create_never_leaves_an_earlier_identity_active(shared, shared_least, first):
    """The new identity is revoked and in revoke's events, or active and created after the revoke committed."""
    place = shared.another_workspace()
    place.create("standing")
    w = ["--workspace-public-id", place.workspace["publicId"]]
    results = race(place, shared_least, {
        "create": ["create", *w, "--slug", "newcomer", "--display-name", "N", "--token-name", "t", "--scopes",
                   "boards:read", "--confirm", "--json"],
        "revoke": ["revoke", *w, "--all", "--confirm", "--json"]}, first)
    assert [run.code for run in results.values()] == [0, 0], results
    newcomer = results["create"].json["identity"]["publicId"]
    events = place.events()
    revoked = [e for e in events if e["action"] == "identity.revoked"]
    [created] = [e for e in events if e["action"] == "identity.created" and e["identityPublicId"] == newcomer]
    status = {i["slug"]: i["status"] for i in place("list", "--json").json["identities"]}
    assert status["standing"] == "revoked"
    if status["newcomer"] == "revoked":
        assert newcomer in [i["publicId"] for i in results["revoke"].json["identities"]]
        assert newcomer in [e["identityPublicId"] for e in revoked]
    else:
        assert status["newcomer"] == "active"
        assert created["sequence"] > max(e["sequence"] for e in revoked)
    assert verified(place)[0].code == 0


@pytest.mark.parametrize("first", ["rotate", "revoke"])
def test_revoke_all_racing_a_rotate_revokes_the_rotated_in_token(shared, shared_least, first):
    """A token rotated in before the revoke is revoked and listed in its identity.revoked event; none is live after."""
    place = shared.another_workspace()
    place.create("spinning")
    w = ["--workspace-public-id", place.workspace["publicId"]]
    results = race(place, shared_least, {
        "rotate": ["rotate", *w, "--slug", "spinning", "--confirm", "--json"],
        "revoke": ["revoke", *w, "--all", "--confirm", "--json"]}, first)
    assert results["revoke"].code == 0, results["revoke"].stderr
    [event] = [e for e in place.events() if e["action"] == "identity.revoked"]
    listed = event["metadata"]["revokedTokenPublicIds"]
    tokens = {t["publicId"]: t for t in place("inspect", "--slug", "spinning", "--json").json["identity"]["tokens"]}
    assert not [t for t in tokens.values() if t["live"] or t["revokedAt"] is None], tokens
    if results["rotate"].code == 0:
        rotated_in = results["rotate"].json["token"]["publicId"]
        assert rotated_in in tokens and rotated_in in listed
    else:
        assert results["rotate"].code == 5 and len(tokens) == 1, results["rotate"]
    assert verified(place)[0].code == 0


@pytest.fixture(scope="module")
def large_workspace(shared):
    """A workspace of a few thousand events, made fast (seed_scale), its chain intact."""
    place = shared.another_workspace()
    with place.connect() as conn:
        support.seed_scale(conn, place.workspace["id"], identities=40, tokens=400, events=4000)
    return place


def terminated_midway(place: Place, dsn: str, after: int, env: dict) -> tuple[int, bytes, str]:
    """audit --jsonl --all read slowly; SIGTERM once after bytes have come; then read the rest."""
    process = support.start_cli(["audit", "--workspace-public-id", place.workspace["publicId"], "--jsonl", "--all"],
                                dsn, {"AGENT_IDENTITY_ADMIN_EMAIL": place.admin, **env})
    output, fd = bytearray(), process.stdout.fileno()
    try:
        while len(output) < after:
            chunk = os.read(fd, 8192)
            if not chunk:
                break
            output += chunk
            time.sleep(0.002)  # a slow reader: the tool's writes block on a full pipe
        process.send_signal(signal.SIGTERM)
        while chunk := os.read(fd, 65536):
            output += chunk
        code = process.wait(timeout=30)
        return code, bytes(output), process.stderr.read()
    finally:
        process.kill()
        process.wait()


# PYTHONUNBUFFERED=1 (as many container images set it) makes sys.stdout's buffer a raw FileIO,
# whose write a signal can cut short: the output must still end on a whole line.
@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "PYTHONUNBUFFERED=1"])
def test_sigterm_during_audit_jsonl_all_ends_on_a_whole_line(large_workspace, shared_least, unbuffered):
    """10 runs, each terminated at another point: exit 143, and every line of the output parses as JSON."""
    for run in range(10):
        code, output, stderr = terminated_midway(large_workspace, shared_least, 20_000 + run * 110_000,
                                                 {"PYTHONUNBUFFERED": unbuffered})
        assert code == 143, (run, code, stderr)
        assert output.endswith(b"\n"), (run, len(output), output[-200:])
        lines = output.decode().splitlines()
        assert all(json.loads(line)["publicId"] for line in lines)
        assert 0 < len(lines) < 4000, "the signal came mid-stream"
