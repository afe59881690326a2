"""The notes people write on alarms and incidents: acknowledgements and follow-ups, in order, never on a ghost."""

from __future__ import annotations

from examwatch.gateway import store


def test_acknowledgement_and_follow_ups_are_kept_in_order(store_backend):
    conn = store.connect(store_backend)
    conn.execute(
        "INSERT INTO alarms (id, site, room, rule, level, state, device, message, raised_at, updated_at, source) "
        "VALUES ('a1', 's', 'r101', 'ups_on_battery', 1, 'active', 'ups', '市电中断', 10, 10, 'agent')"
    )
    assert store.acknowledge(conn, "alarms", "a1", "张老师", "已到场", 20.0)
    assert store.add_note(conn, "alarm", "a1", "张老师", "measure", "更换备用UPS", 30.0)
    assert store.add_note(conn, "alarm", "a1", "李老师", "result", "恢复供电", 40.0)
    assert not store.add_note(conn, "alarm", "nope", "张老师", "measure", "x", 50.0)
    assert not store.acknowledge(conn, "incidents", "nope", "张老师", "x", 50.0)
    assert [(n["category"], n["who"], n["text"]) for n in store.notes(conn, "alarm", "a1")] == [
        ("ack", "张老师", "已到场"),
        ("measure", "张老师", "更换备用UPS"),
        ("result", "李老师", "恢复供电"),
    ]
    assert store.notes(conn, "incident", "a1") == []
