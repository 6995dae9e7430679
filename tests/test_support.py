"""The suite's own helpers, where a mistake would make other tests flaky or blind."""

import pytest

from tests import support


def test_added_rows_come_oldest_first_across_a_digit_boundary():
    """Snapshots sort rows as JSON text, where id 100 comes before 99; added rows must not."""
    before = {"agent_audit_event": ['{"id": 98, "action": "identity.created"}']}
    after = {"agent_audit_event": sorted(before["agent_audit_event"] + [
        '{"id": 99, "action": "access.denied"}', '{"id": 100, "action": "identity.paused"}'])}
    added = support.added_rows(before, after)
    assert [row["id"] for row in added["agent_audit_event"]] == [99, 100]


def test_added_rows_without_serial_ids_and_a_vanished_row():
    before = {"workspace_members": ['{"userId": "b"}'], "agent_token": []}
    assert support.added_rows(before, {"workspace_members": ['{"userId": "b"}', '{"userId": "a"}'],
                                       "agent_token": []}) == {"workspace_members": [{"userId": "a"}]}
    with pytest.raises(AssertionError, match="workspace_members: rows changed or deleted"):
        support.added_rows(before, {"workspace_members": [], "agent_token": []})
