"""The check before every workspace command: the workspace exists and the actor manages it.

Each case builds a fresh workspace and user, gives the user the memberships
described, and runs `list` (a read) as that user. Kan's rule: a member
override decides; else the member's custom role must grant workspace:manage;
else the legacy role decides, and only admin manages.
"""

import pytest

import agent_identity_admin as tool
from tests import support

MANAGE = "workspace:manage"
NOT_ACTIVE = "is not an active member of workspace"
LACKS = "lacks the workspace:manage permission in workspace"


def membership(**kwargs):
    return lambda kan, ws, user: kan.member(ws, user, **kwargs)


def with_override(granted, **kwargs):
    def build(kan, ws, user):
        kan.override(kan.member(ws, user, **kwargs), MANAGE, granted)
    return build


def with_role(permissions, role="member", override=None, role_workspace=None):
    def build(kan, ws, user):
        role_id = kan.role(role_workspace(kan) if role_workspace else ws, permissions)
        member = kan.member(ws, user, role=role, role_id=role_id)
        if override is not None:
            kan.override(member, MANAGE, override)
    return build


def several(*builders):
    def build(kan, ws, user):
        for builder in builders:
            builder(kan, ws, user)
    return build


CASES = {
    "legacy admin": (membership(role="admin"), 0, None),
    "legacy member": (membership(role="member"), 4, LACKS),
    "legacy guest": (membership(role="guest"), 4, LACKS),
    "invited admin": (membership(status="invited"), 4, NOT_ACTIVE),
    "removed admin": (membership(status="removed"), 4, NOT_ACTIVE),
    "paused admin": (membership(status="paused"), 4, NOT_ACTIVE),
    "soft-deleted admin membership": (membership(deleted=True), 4, NOT_ACTIVE),
    "no membership": (lambda kan, ws, user: None, 4, NOT_ACTIVE),
    "admin whose override denies": (with_override(False, role="admin"), 4, LACKS),
    "member whose override grants": (with_override(True, role="member"), 0, None),
    "guest whose override grants": (with_override(True, role="guest"), 0, None),
    "custom role granting manage": (with_role({MANAGE: True}), 0, None),
    "custom role without manage, legacy admin": (with_role({"boards:read": True}, role="admin"), 4, LACKS),
    "custom role with manage not granted": (with_role({MANAGE: False}, role="admin"), 4, LACKS),
    "custom role granting, override denying": (with_role({MANAGE: True}, override=False), 4, LACKS),
    "custom role lacking, override granting": (with_role({}, override=True), 0, None),
    "custom role of another workspace": (
        with_role({MANAGE: True}, role_workspace=lambda kan: kan.workspace()), 4, LACKS),
    "removed membership beside an active admin one": (
        several(membership(status="removed", role="member"), membership(role="admin")), 0, None),
    "active member beside an invited admin one": (
        several(membership(role="member"), membership(status="invited")), 4, LACKS),
    # Two active memberships (Kan's schema allows it): an explicit deny on either wins.
    "active admin beside an active membership whose override denies": (
        several(membership(role="admin"), with_override(False, role="member")), 4, LACKS),
    "override granting beside an override denying": (
        several(with_override(True, role="member"), with_override(False, role="admin")), 4, LACKS),
    "custom role granting beside an admin whose override denies": (
        several(with_role({MANAGE: True}), with_override(False, role="admin")), 4, LACKS),
    "two active admin memberships": (several(membership(role="admin"), membership(role="admin")), 0, None),
    "denying override on a removed membership beside an active admin": (
        several(with_override(False, role="admin", status="removed"), membership(role="admin")), 0, None),
}


@pytest.mark.parametrize("case", CASES)
def test_actor_check(kan, cli, case):
    build, code, message = CASES[case]
    workspace, user = kan.workspace(), kan.user()
    build(kan, workspace, user)
    result = support.Operator(cli, workspace, user["email"])("list", json=False)
    assert result.code == code, result.stderr
    if message:
        assert result.stderr == (
            f'agent-identity: error: "{user["email"]}" {message} {workspace["publicId"]}\n'
        )
        assert result.stdout == ""


def test_unknown_user_is_refused(kan, cli):
    workspace = kan.workspace()
    result = support.Operator(cli, workspace, "nobody@example.com")("list", json=False)
    assert result.code == 4
    assert result.stderr == 'agent-identity: error: no Kan user has the email "nobody@example.com"\n'


def test_email_is_matched_case_insensitively(kan, cli):
    workspace, admin = kan.managed_workspace()
    result = support.Operator(cli, workspace, admin["email"].upper())("list")
    assert result.code == 0, result.stderr
    assert result.json["identities"] == []


def test_missing_workspace_is_not_found(kan, cli):
    admin = kan.user()
    result = support.Operator(cli, {"publicId": "Zz00Zz00Zz00"}, admin["email"])("list")
    assert result.code == 3
    assert result.json["error"] == {"code": 3, "kind": "not_found", "message": "workspace Zz00Zz00Zz00 not found"}


def test_soft_deleted_workspace_is_not_found(kan, cli):
    workspace = kan.workspace(deleted=True)
    admin = kan.user()
    kan.member(workspace, admin)
    result = support.Operator(cli, workspace, admin["email"])("list")
    assert result.code == 3
    assert result.json["error"]["message"] == f"workspace {workspace['publicId']} has been deleted"


def test_a_refused_mutation_writes_only_its_access_denied_event(kan, cli, db):
    workspace, member = kan.workspace(), kan.user()
    kan.member(workspace, member, role="member")
    intruder = support.Operator(cli, workspace, member["email"])
    attempt = ["create", "--slug", "sneaky", "--display-name", "Sneaky", "--token-name", "t",
               "--scopes", "boards:read", "--reason", "just looking"]

    before = support.snapshot(db)
    assert intruder(*attempt, "--dry-run").code == 4
    assert support.snapshot(db) == before, "a refused dry run writes nothing at all"

    assert intruder(*attempt, "--confirm").code == 4
    [event] = support.added_rows(before, support.snapshot(db)).pop("agent_audit_event")
    assert support.added_rows(before, support.snapshot(db)).keys() == {"agent_audit_event"}
    assert event["action"] == "access.denied"
    assert (event["actorEmail"], event["actorUserId"]) == (member["email"], str(member["id"]))
    assert (event["workspaceId"], event["agentIdentityId"], event["reason"]) == (workspace["id"], None, "just looking")
    assert event["metadata"] == {"command": "create", "condition": "lacks_workspace_manage", "slug": "sneaky",
                                 "tokenPublicId": None, "toolVersion": tool.__version__}


@pytest.mark.parametrize("setup, condition", [
    (lambda kan, ws: kan.user(), "not_an_active_member"),
    (lambda kan, ws: {"email": "ghost@example.com", "id": None}, "not_a_kan_user"),
])
def test_each_refusal_names_its_condition(kan, cli, db, setup, condition):
    workspace = kan.workspace()
    actor = setup(kan, workspace)
    before = support.snapshot(db)
    assert support.Operator(cli, workspace, actor["email"])("list").code == 4
    [event] = support.added_rows(before, support.snapshot(db))["agent_audit_event"]
    assert (event["metadata"]["condition"], event["metadata"]["command"]) == (condition, "list")
    assert event["actorEmail"] == actor["email"]


def test_a_missing_workspace_records_no_denial(kan, cli, db):
    user = kan.user()
    before = support.snapshot(db)
    assert support.Operator(cli, {"publicId": "Zz11Zz11Zz11"}, user["email"])("list").code == 3
    assert support.added_rows(before, support.snapshot(db)) == {}


@pytest.mark.skipif(support.PROVEN, reason=support.NAMES_WHAT_IT_AIMED_AT)
def test_managing_workspace_a_gives_no_power_over_workspace_b(kan, cli, db, operator):
    """The admin of A can neither see nor change B's identities, by either workspace id."""
    other_workspace, other_admin = kan.managed_workspace()
    other = support.Operator(cli, other_workspace, other_admin["email"])
    other.create("b-bot")
    before = support.snapshot(db)

    intruder = support.Operator(cli, other_workspace, operator.email)
    for command in (["rotate", "--confirm"], ["revoke", "--confirm"], ["pause", "--confirm"], ["inspect"]):
        result = intruder(command[0], "--slug", "b-bot", *command[1:])
        assert result.code == 4, result.stdout
        assert "is not an active member" in result.json["error"]["message"]
    assert intruder("list").code == 4

    own_workspace_other_slug = operator("revoke", "--slug", "b-bot", "--confirm")
    assert own_workspace_other_slug.code == 3
    added = support.added_rows(before, support.snapshot(db))
    assert added.keys() == {"agent_audit_event"}, "nothing but the record of the refusals"
    assert [(e["action"], e["metadata"]["command"]) for e in added["agent_audit_event"]] == [
        ("access.denied", command) for command in ("rotate", "revoke", "pause", "inspect", "list")]
    inspected = other("inspect", "--slug", "b-bot").json["identity"]
    assert inspected["status"] == "active"
    assert [e["action"] for e in inspected["events"]][:4] == ["access.denied"] * 4, "the owner sees the attempts"
    assert inspected["events"][0]["actorEmail"] == operator.email
