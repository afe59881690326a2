"""Correlation across the rooms of a site: pure logic."""

from __future__ import annotations

from examwatch.gateway.config import CorrelationRule
from examwatch.gateway.correlate import Fault, correlate

NET = CorrelationRule(
    fault_class="network",
    title="考点多个考场网络中断",
    rules=["agent_offline", "link_down"],
    min_rooms=2,
    window=300.0,
    site_share=0.5,
)
POWER = CorrelationRule(
    fault_class="power", title="市电中断", rules=["ups_on_battery"], site_share=0.0, site_rooms=["power-room"]
)
ROSTER = {"s1": 8, "s2": 8}


def down(room: str, t: float, rule: str = "agent_offline", site: str = "s1") -> Fault:
    return Fault(site, room, rule, t)


def test_one_room_is_no_incident():
    incidents, changes, _ = correlate({}, [down("101", 0)], [NET], ROSTER, 10)
    assert incidents == {} and changes == []


def test_two_rooms_one_level2_incident_a_third_joins_and_the_id_holds():
    incidents, changes, _ = correlate({}, [down("101", 0), down("102", 60, "link_down")], [NET], ROSTER, 70)
    [inc] = incidents.values()
    assert (inc.level, inc.members, inc.active) == (2, ["101", "102"], ["101", "102"])
    assert [c.what for c in changes] == ["opened"]
    incidents, changes, _ = correlate(
        incidents, [down("101", 0), down("102", 60), down("103", 500)], [NET], ROSTER, 510
    )
    [again] = incidents.values()
    assert again.id == inc.id and again.members == ["101", "102", "103"] and again.level == 2
    assert [(c.what, c.rooms) for c in changes] == [("joined", ("103",))]


def test_rooms_outside_the_window_do_not_open_one():
    incidents, _, _ = correlate({}, [down("101", 0), down("102", 301)], [NET], ROSTER, 400)
    assert incidents == {}


def test_other_sites_and_other_classes_stay_apart():
    faults = [down("101", 0), down("201", 1, site="s2"), Fault("s1", "102", "ups_on_battery", 2)]
    incidents, _, _ = correlate({}, faults, [NET, POWER], ROSTER, 5)
    assert incidents == {}


def test_recovery_leaves_then_closes_and_the_level_never_drops():
    faults = [down(r, i) for i, r in enumerate(["101", "102", "103", "104"])]
    incidents, changes, _ = correlate({}, faults, [NET], ROSTER, 5)
    [inc] = incidents.values()
    assert inc.level == 3 and [c.what for c in changes] == ["opened", "escalated"]  # 4 of 8 rooms: half the site
    incidents, changes, _ = correlate(incidents, faults[:1], [NET], ROSTER, 6)
    [inc2] = incidents.values()
    assert (inc2.id, inc2.level, inc2.active, len(inc2.members)) == (inc.id, 3, ["101"], 4)
    assert [c.what for c in changes] == ["left"]
    incidents, changes, closed = correlate(incidents, [], [NET], ROSTER, 7)
    assert incidents == {} and [c.what for c in changes] == ["left", "closed"]
    assert closed[0].state == "closed" and closed[0].closed_at == 7
    # a new outage later is a new incident
    incidents, _, _ = correlate({}, [down("101", 1000), down("102", 1001)], [NET], ROSTER, 1002)
    assert next(iter(incidents.values())).id != inc.id


def test_site_room_alone_is_level3():
    incidents, _changes, _ = correlate({}, [Fault("s1", "power-room", "ups_on_battery", 0)], [POWER], ROSTER, 1)
    [inc] = incidents.values()
    assert inc.level == 3 and inc.members == ["power-room"]


def test_several_alarms_of_one_room_count_once():
    faults = [down("101", 0), down("101", 5, "link_down")]
    assert correlate({}, faults, [NET], ROSTER, 6)[0] == {}
