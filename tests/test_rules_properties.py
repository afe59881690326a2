"""Properties of the evaluator, checked against tiny reference models written independently here."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from examwatch.edge.config import AgentSettings, Device
from examwatch.kernel.model import Reading
from examwatch.rules.config import Schedule
from examwatch.rules.engine import RuleEngine
from examwatch.rules.model import Rule

AGENT = AgentSettings(site="s", room="r")
MIC = [Device(name="mic", kind="noise", protocol="test", interval=1e9)]
FAST = settings(max_examples=150, deadline=None)


def engine(rule: Rule) -> RuleEngine:
    return RuleEngine([rule], MIC, AGENT, Schedule())


@st.composite
def hysteresis_rules(draw: st.DrawFn) -> Rule:
    op = draw(st.sampled_from([">", ">=", "<", "<="]))
    threshold = draw(st.integers(-50, 50))
    gap = draw(st.integers(1, 20))
    clear = threshold - gap if op in (">", ">=") else threshold + gap
    return Rule(id="p", title="p", metric="noise_db", op=op, threshold=threshold, clear=clear)


def values_near(rule: Rule) -> st.SearchStrategy[float]:
    """Values on, between and around the threshold and the clear value, where the edges are."""
    assert rule.clear is not None
    lo, hi = sorted((rule.threshold, rule.clear))
    return st.one_of(
        st.sampled_from([lo, hi, lo - 0.5, hi + 0.5]),
        st.floats(lo - 10, hi + 10, allow_nan=False),
        st.floats(lo, hi, exclude_min=True, exclude_max=True),
    )


@FAST
@given(data=st.data())
def test_no_flapping_inside_the_hysteresis_band(data: st.DataObject) -> None:
    rule = data.draw(hysteresis_rules())
    values = data.draw(st.lists(values_near(rule), min_size=1, max_size=40))
    eng = engine(rule)
    state = eng.initial_state()
    lo, hi = sorted((rule.threshold, rule.clear or 0.0))
    active = False
    for i, v in enumerate(values):
        state, events = eng.evaluate(state, [Reading("mic", "noise_db", v, float(i))], float(i))
        now_active = bool(state.open_alarms())
        if lo < v < hi:  # strictly inside the band: nothing changes
            assert now_active == active and events == []
        # the reference: raise when the condition holds, clear only past the clear value
        if active:
            expected = not ((v <= rule.clear) if rule.op in (">", ">=") else (v >= rule.clear))
        else:
            expected = (v > rule.threshold, v >= rule.threshold, v < rule.threshold, v <= rule.threshold)[
                [">", ">=", "<", "<="].index(rule.op)
            ]
        assert now_active == expected
        assert [e.state for e in events] == ([] if expected == active else ["raised" if expected else "cleared"])
        active = now_active


# One step of a random history: a reading (time step, value) or a bare tick (time step, None).
steps = st.lists(
    # steps that add up to the `for` durations below exactly, so the boundary itself gets tested
    st.tuples(st.sampled_from([0.0, 0.5, 1.0, 2.5]), st.one_of(st.none(), st.sampled_from([40.0, 50.0, 60.0, 70.0]))),
    min_size=1,
    max_size=60,
)


@FAST
@given(hold=st.sampled_from([0.0, 1.0, 2.5, 5.0]), history=steps)
def test_raised_iff_the_condition_held_for_its_duration(hold: float, history: list[tuple[float, float | None]]) -> None:
    rule = Rule(id="p", title="p", metric="noise_db", op=">", threshold=50, for_=hold)
    eng = engine(rule)
    state = eng.initial_state()
    t = 0.0
    value: float | None = None  # the reference: the latest value, and since when the condition has held
    run_start: float | None = None
    for dt, reading in history:
        t += dt
        if reading is not None:
            if reading > 50:
                if run_start is None:
                    run_start = t
            else:
                run_start = None
            value = reading
        state, events = eng.evaluate(state, [] if reading is None else [Reading("mic", "noise_db", reading, t)], t)
        expected = run_start is not None and t - run_start >= hold
        alarms = state.open_alarms()
        assert bool(alarms) == expected, (t, value, run_start)
        if alarms:
            assert alarms[0].since == run_start and alarms[0].raised_at <= t
        for e in events:
            if e.state == "raised":
                assert e.raised_at - e.since >= hold


@FAST
@given(history=steps)
def test_evaluate_is_a_function_of_its_inputs(history: list[tuple[float, float | None]]) -> None:
    rule = Rule(id="p", title="p", metric="noise_db", op=">", threshold=50, clear=45, for_=2.0)
    eng = engine(rule)
    state = eng.initial_state()
    t = 0.0
    for dt, reading in history:
        t += dt
        batch = [] if reading is None else [Reading("mic", "noise_db", reading, t)]
        first = eng.evaluate(state, batch, t)
        assert eng.evaluate(state, batch, t) == first  # same state in, same state and events out
        state = first[0]


@FAST
@given(history=steps)
def test_silent_iff_no_reading_for_its_limit(history: list[tuple[float, float | None]]) -> None:
    rule = Rule(id="quiet", type="silent", title="p", silent_intervals=3)
    eng = RuleEngine([rule], [Device(name="mic", kind="noise", protocol="test", interval=1.0)], AGENT, Schedule())
    state = eng.initial_state()
    t = 0.0
    last: float | None = None  # the reference: the latest reading, or the first evaluation
    for dt, reading in history:
        t += dt
        if reading is not None or last is None:
            last = t
        state, _ = eng.evaluate(state, [] if reading is None else [Reading("mic", "noise_db", reading, t)], t)
        assert bool(state.open_alarms()) == (t - last >= 3.0), (t, last)
