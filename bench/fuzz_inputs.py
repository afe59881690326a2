"""Input generators for bench/fuzz.py: each format's shape, real samples mutated byte by byte, and noise.

A generator that knows the shape gets past the first checks (a Q1 line that starts with ``(`` and ends
with ``\\r``, an envelope with every field), where the interesting bugs are; mutation and raw bytes cover
what no shape foresaw. Every strategy yields bytes or str.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]

# Values that break parsers: separators, quotes, escapes, numbers out of range or not numbers at all.
TOKENS = [
    b"",
    b"\x00",
    b"\r",
    b"\n",
    b"\r\n",
    b" ",
    b'"',
    b"'",
    b"\\",
    b"-",
    b"+",
    b".",
    b"-1",
    b"0",
    b"00000",
    b"nan",
    b"NaN",
    b"inf",
    b"-inf",
    b"Infinity",
    b"1e999",
    b"-1e999",
    b"1e-999",
    b"9" * 400,
    b"1_0",
    b"0x10",
    b"\xff\xfe",
    "中文".encode(),
    "١٢٣".encode(),
    b"<",
    b">",
    b"&",
    b"&amp;",
    b"[",
    b"]",
    b"{",
    b"}",
    b"=",
    b"#",
    b",",
    b":",
    b"\t",
    b"\x7f",
    b"%00",
    b"%",
    b"&&",
    b"==",
]
NUMBERS = [
    "0",
    "1",
    "-1",
    "0.5",
    "230.0",
    "65535",
    "4294967296",
    "1e308",
    "1e999",
    "-1e999",
    "9" * 400,
    "nan",
    "inf",
    "-0",
    "1.7976931348623157e308",
]


class Invariant(Exception):
    """The parser returned, but what it returned breaks the contract (a NaN reading, a bad name, ...)."""


def mutate(rng: random.Random, data: bytes, corpus: Sequence[bytes] = (), max_ops: int = 4) -> bytes:
    """A few byte-level edits: flips, inserts, deletions, repeats, tokens, truncation, splices of another input."""
    out = bytearray(data)
    for _ in range(rng.randint(1, max_ops)):
        op = rng.choice(("flip", "insert", "delete", "repeat", "token", "token", "truncate", "splice"))
        pos = rng.randint(0, len(out))
        if op == "flip" and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == "insert":
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == "delete":
            del out[pos : pos + rng.randint(1, 16)]
        elif op == "repeat":
            out[pos:pos] = bytes(out[pos : pos + rng.randint(1, 16)]) * rng.randint(1, 64)
        elif op == "token":
            out[pos:pos] = rng.choice(TOKENS)
        elif op == "truncate":
            del out[pos:]
        elif op == "splice" and corpus:
            other = rng.choice(corpus)
            start = rng.randint(0, len(other))
            out[pos:pos] = other[start : start + rng.randint(1, 64)]
    return bytes(out)


def mutated(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(mutate, st.randoms(use_true_random=False), base)


def shaped(structured: st.SearchStrategy[bytes], samples: list[bytes], noise: int = 300) -> st.SearchStrategy[bytes]:
    """The usual mix: structured inputs (as they are and mutated), real samples mutated, and raw bytes."""
    seeds = st.sampled_from(samples) if samples else structured
    return st.one_of(structured, mutated(structured), mutated(seeds), st.binary(max_size=noise))


def nested(open_: bytes, close: bytes, inner: bytes = b"1") -> st.SearchStrategy[bytes]:
    """Deep nesting: the classic way to exhaust a recursive parser's stack."""
    depth = st.one_of(st.integers(1, 64), st.integers(500, 200_000))
    return depth.map(lambda d: open_ * d + inner + close * d)


def as_text(strategy: st.SearchStrategy[bytes]) -> st.SearchStrategy[str]:
    return strategy.map(lambda b: b.decode("utf-8", errors="replace"))


# --- JSON: envelopes and sensor payloads ------------------------------------------------------------------

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**400), 10**400),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["online", "offline", "true", "1", "", "ok"]),
)
json_value = st.recursive(
    json_scalar,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()  # NaN/Infinity: a sender may well write them


def envelope() -> st.SearchStrategy[bytes]:
    body = st.one_of(json_value, st.just([{"device": "ups1", "metric": "ups_load_percent", "value": 12.0, "ts": 1.0}]))
    fields = st.fixed_dictionaries(
        {
            "v": st.one_of(st.just(1), json_scalar),
            "agent": st.one_of(st.just("s1/r1"), json_scalar),
            "seq": st.one_of(st.integers(0, 10**6), json_scalar),
            "ts": st.one_of(st.floats(), json_scalar),
            "kind": st.one_of(st.sampled_from(["readings", "alarms", "status"]), json_scalar),
            "body": body,
            "sig": st.one_of(st.just("ab" * 32), json_scalar),
        },
        optional={"extra": json_value},
    ).map(_dumps)
    deep = st.one_of(nested(b"[", b"]"), nested(b'{"a":', b"}")).map(
        lambda b: b'{"v":1,"agent":"s1/r1","seq":1,"ts":1.0,"kind":"readings","body":' + b + b',"sig":""}'
    )
    sample = (
        b'{"v":1,"agent":"s1/r1","seq":7,"ts":1700000000.5,"kind":"readings",'
        b'"body":[{"device":"ups1","metric":"ups_load_percent","value":12.0,"ts":1.0}],"sig":"00"}'
    )
    return st.one_of(shaped(fields, [sample]), deep)


def mqtt_payload() -> st.SearchStrategy[bytes]:
    keys = ["contact", "battery", "voltage", "linkquality", "noise", "recording", "storage", "state"]
    value = st.one_of(
        json_scalar, json_value, st.fixed_dictionaries({}, optional={"free_mb": json_scalar, "total_mb": json_scalar})
    )
    doc = st.dictionaries(st.sampled_from(keys), value, max_size=6).map(_dumps)
    samples = [
        b'{"battery":91,"contact":true,"linkquality":120,"voltage":3005}',
        b'{"noise":55.5,"battery":80}',
        b'{"battery":50,"recording":true,"storage":{"free_mb":1024,"total_mb":4096}}',
    ]
    deep = st.one_of(nested(b"[", b"]"), nested(b'{"battery":', b"}"))
    return st.one_of(shaped(doc, samples), deep)


# --- serial UPS (Megatec) and Modbus -----------------------------------------------------------------------


def _number(realistic: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(realistic), st.sampled_from(NUMBERS), st.from_regex(r"\A-?\d{1,6}(\.\d{0,4})?\Z"))


def megatec_q1() -> st.SearchStrategy[bytes]:
    num = _number(["230.0", "000.0", "50.0", "13.60", "2.25", "27.0", "100", "018"])
    temp = st.one_of(num, st.sampled_from(["--.-", "-", "-25.0", "---"]))
    bits = st.one_of(st.text("01", min_size=8, max_size=8), st.text("01x", max_size=10))
    line = st.builds(
        lambda nums, t, b, end: ("(" + " ".join(nums) + f" {t} {b}").encode() + end,
        st.lists(num, min_size=6, max_size=6),
        temp,
        bits,
        st.sampled_from([b"\r", b"", b"\r\n", b"\x00\r"]),
    )
    return shaped(
        line,
        [b"(230.0 230.0 230.0 018 50.0 13.60 25.0 00001000\r", b"(000.0 000.0 230.0 030 50.0 11.20 --.- 10001000\r"],
    )


def megatec_f() -> st.SearchStrategy[bytes]:
    num = _number(["230.0", "004", "12.00", "24.00", "50.0"])
    line = st.builds(
        lambda nums, end: ("#" + " ".join(nums)).encode() + end,
        st.lists(num, min_size=4, max_size=4),
        st.sampled_from([b"\r", b"", b"\r\n"]),
    )
    return shaped(line, [b"#230.0 004 12.00 50.0\r", b"#220.0 006 24.00 50.0\r"])


def megatec_i() -> st.SearchStrategy[bytes]:
    line = st.builds(lambda t: ("#" + t + "\r").encode("utf-8", "surrogatepass"), st.text(max_size=40))
    return shaped(line, [b"#EXAMWATCH-SIM   LI-1000    V1.0      \r"])


def _rtu(body: bytes) -> bytes:
    from pymodbus.framer import FramerRTU

    return body + FramerRTU.compute_CRC(body).to_bytes(2, "big")


def modbus_reply() -> st.SearchStrategy[bytes]:
    """Answers to read holding/input registers: right CRC or not, byte counts that lie, exception frames."""
    regs = st.lists(st.integers(0, 0xFFFF), max_size=4).map(lambda rs: b"".join(r.to_bytes(2, "big") for r in rs))
    frame = st.builds(
        lambda slave, fc, count, data: bytes([slave, fc, count % 256 if count is not None else len(data)]) + data,
        st.sampled_from([1, 2, 0, 247]),
        st.sampled_from([3, 4, 0x83, 0x84, 1, 6, 16, 0x2B]),
        st.one_of(st.none(), st.integers(0, 255)),
        regs,
    )
    answers = st.one_of(frame.map(_rtu), frame)
    nan = _rtu(bytes([1, 4, 4, 0x7F, 0xC0, 0, 0]))  # float32 NaN: a meter in an error state may well send it
    return shaped(
        answers,
        [
            _rtu(bytes([1, 3, 2, 0x02, 0x8D])),
            _rtu(bytes([1, 4, 4, 0x42, 0x82, 0x99, 0x9A])),
            nan,
            _rtu(bytes([1, 0x83, 2])),
        ],
        noise=40,
    )


# --- NUT, ISAPI --------------------------------------------------------------------------------------------


def nut_lines() -> st.SearchStrategy[str]:
    names = st.one_of(
        st.sampled_from(
            [
                "battery.charge",
                "battery.runtime",
                "input.voltage",
                "output.voltage",
                "ups.load",
                "input.frequency",
                "ups.status",
                "ups.alarm",
            ]
        ),
        st.text(max_size=12),
    )
    value = st.one_of(st.sampled_from([*NUMBERS, "OL", "OB LB", "OL CHRG RB", "ALARM OVER", ""]), st.text(max_size=12))
    var = st.builds(
        lambda ups, n, v: f'VAR {ups} {n} "{v}"',
        st.sampled_from(["ups1", "ups2", "", "ups1 x"]),
        names,
        value.map(lambda v: v.replace("\\", "\\\\").replace('"', '\\"')),
    )
    other = st.sampled_from(
        [
            "ERR DATA-STALE",
            "ERR ",
            "ERR",
            "BEGIN LIST VAR ups1",
            "END LIST VAR ups1",
            'VAR ups1 x "\\"',
            'VAR ups1 ups.status "OL\\',
            "",
        ]
    )
    lines = st.lists(st.one_of(var, other), max_size=12).map("\n".join)
    sample = b'VAR ups1 battery.charge "100"\nVAR ups1 ups.status "OL"\nVAR ups1 input.voltage "230.0"'
    return st.one_of(lines, as_text(mutated(lines.map(str.encode))), as_text(mutated(st.just(sample))))


def isapi_xml() -> st.SearchStrategy[bytes]:
    ns = st.sampled_from(
        ["", ' xmlns="http://www.hikvision.com/ver20/XMLSchema"', ' xmlns="http://www.std-cgi.com/ver20/XMLSchema"']
    )
    text = st.one_of(st.sampled_from([*NUMBERS, "ok", "idle", "error", "OK", "notexist", ""]), st.text(max_size=12))
    esc = text.map(lambda t: t.replace("&", "&amp;").replace("<", "&lt;"))
    disk = st.builds(
        lambda tag, id_, status, cap, free: (
            f"<{tag}><id>{id_}</id><status>{status}</status><capacity>{cap}</capacity>"
            f"<freeSpace>{free}</freeSpace></{tag}>"
        ),
        st.sampled_from(["hdd", "HDD", "nas"]),
        st.one_of(st.integers(0, 99).map(str), esc, st.just("x" * 300)),
        esc,
        esc,
        esc,
    )
    doc = st.builds(
        lambda n, hdds, nases: (
            f'<?xml version="1.0" encoding="UTF-8"?><storage{n}><hddList>{"".join(hdds)}</hddList>'
            f"<nasList>{''.join(nases)}</nasList></storage>".encode("utf-8", "surrogatepass")
        ),
        ns,
        st.lists(disk, max_size=4),
        st.lists(disk, max_size=2),
    )
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE storage [<!ENTITY a "aaaaaaaaaa">'
        + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefgh", "bcdefghi", strict=True))
        + "]><storage><hddList><hdd><id>1</id><status>&i;</status></hdd></hddList></storage>"
    ).encode()
    xxe = b'<?xml version="1.0"?><!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]><storage><hddList><hdd><id>&x;</id></hdd></hddList></storage>'
    samples = [p.read_bytes() for p in sorted((ROOT / "tests/data/isapi").glob("*.xml"))] + [laughs, xxe]
    deep = nested(b"<storage>", b"</storage>", b"")
    return st.one_of(shaped(doc, samples), deep)


# --- TOML configs, API query strings -----------------------------------------------------------------------

TOML_VALUES = [
    "-1",
    "0",
    "1e999",
    "inf",
    "nan",
    "-inf",
    "99999999999999999999999",
    '""',
    '"' + "x" * 5000 + '"',
    "[]",
    "{}",
    "true",
    '"../../x"',
    "[1, 2]",
    '"nan"',
    "1.5",
    '"中文"',
    '"\\u0000"',
    "1979-05-27T07:32:00Z",
    "[" * 3000 + "]" * 3000,
    "{a = {b = {c = 1}}}",
    '"127.0.0.1:99999"',
    '":"',
    '"a/b"',
    '"00"',
]


@st.composite
def _toml_edit(draw: st.DrawFn, text: str) -> str:
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(("value", "uncomment", "delete", "duplicate")))
        line = lines[i]
        if op == "value" and "=" in line:
            lines[i] = (
                line.split("=", 1)[0].lstrip("# ")
                + "= "
                + draw(st.one_of(st.sampled_from(TOML_VALUES), st.text(max_size=8)))
            )
        elif op == "uncomment":
            lines[i] = line.lstrip("# ")
        elif op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, line)
        if not lines:
            break
    return "\n".join(lines)


def toml_config(component: str) -> st.SearchStrategy[str]:
    sample = (ROOT / component / "sample.toml").read_text(encoding="utf-8")
    edited = _toml_edit(sample)
    return st.one_of(
        edited, as_text(mutated(edited.map(str.encode))), as_text(nested(b"a = [", b"]")), st.text(max_size=200)
    )


def api_query() -> st.SearchStrategy[str]:
    paths = st.sampled_from(
        [
            "/api/v1/alarms",
            "/api/v1/alarms/timeline",
            "/api/v1/incidents",
            "/api/v1/agents",
            "/api/v1/ack",
            "/api/v1/notifications",
            "/api/v1/ack/link",
            "POST /api/v1/ack/link",
            "/",
            "/api/v1/",
            "/api/v1/x",
            "/desk/api/room",
            "/desk/api/incident",
            "/desk/reports",
        ]
    )
    keys = st.one_of(
        st.sampled_from(
            ["state", "level", "site", "room", "limit", "id", "since", "kind", "exp", "sig", "who", "note", "x", ""]
        ),
        st.sampled_from(["agent", "day", "form", "format", "incident"]),  # the desk's
    )
    vals = st.one_of(
        st.sampled_from([*NUMBERS, "active", "open", "closed", "raised", "S", "R", "%00", "%ZZ", ""]),
        st.text(max_size=10),
    )
    query = st.lists(st.builds(lambda k, v: f"{k}={v}", keys, vals), max_size=6).map("&".join)
    structured = st.builds(lambda p, q: f"{p}?{q}", paths, query)
    return st.one_of(structured, as_text(mutated(structured.map(str.encode))), st.text(max_size=100))
