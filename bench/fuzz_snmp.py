"""The fuzz harness's SNMPv2c answers (bench/fuzz.py's target snmp_v2c): generator and call."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

from bench.fuzz_inputs import Invariant, shaped


def snmp_response() -> st.SearchStrategy[bytes]:
    """SNMPv2c answers: every value type the decoder knows (and some it does not), then mutated."""
    from examwatch.collectors._snmp_v2c import encode_message

    oid = st.lists(st.integers(0, 2**32), min_size=0, max_size=12).map(lambda ns: ".".join(map(str, [1, 3, *ns])))
    value = st.one_of(
        st.tuples(st.just(0x00), st.just(0x02), st.integers(-(2**70), 2**70)),  # INTEGER
        st.tuples(st.just(0x00), st.just(0x04), st.binary(max_size=40)),  # OCTET STRING
        st.tuples(st.sampled_from([0x40, 0x80]), st.integers(0, 10), st.binary(max_size=12)),  # application, context
    )
    var_bind = st.builds(lambda o, v: (o, v[0], v[1], v[2]), oid, value)
    response = st.builds(encode_message, st.just(b"ups"), st.just(2), st.integers(0, 2**31), st.integers(0, 20),
                         st.just(0), st.lists(var_bind, max_size=8))  # fmt: skip
    return shaped(response, [], noise=600)


def call_snmp(decode_response: Callable, data: bytes) -> None:
    _, _, _, var_binds = decode_response(data, b"ups")
    for oid, value in var_binds:
        if not (isinstance(oid, tuple) and all(isinstance(n, int) for n in oid)):
            raise Invariant(f"oid {oid!r}")
        if not (value is None or isinstance(value, (int, str))):
            raise Invariant(f"value {value!r}")
