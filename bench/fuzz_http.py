"""Inputs for the gateway's HTTP side beyond the query (bench/fuzz_inputs.py has that): request heads, desk bodies."""

from __future__ import annotations

from hypothesis import strategies as st

from bench.fuzz_inputs import mutated, nested


def http_head() -> st.SearchStrategy[bytes]:
    """A request's line and headers as the gateway's connections see them before h11 (api.check_head)."""
    lines = st.sampled_from(
        [
            b"Content-Length: 12",
            b"Content-Length: -1",
            b"content-length: 99999999999",
            b"Content-Length: 1, 2",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: gzip",
            b"Host: x",
            b"X",
            b":",
            b"",
        ]
    )
    structured = st.builds(
        lambda m, hs: m + b" /desk/api/ack HTTP/1.1\r\n" + b"\r\n".join(hs),
        st.sampled_from([b"GET", b"POST", b"PUT", b""]),
        st.lists(lines, max_size=5),
    )
    return st.one_of(structured, mutated(structured), st.binary(max_size=200))


def desk_body() -> st.SearchStrategy[bytes]:
    """The duty desk's JSON bodies (a follow-up note: the widest of them)."""
    good = b'{"kind": "incident", "id": "s1/power/1", "category": "measure", "text": "\xe6\x8e\xaa"}'
    return st.one_of(st.just(good), mutated(st.just(good)), nested(b"[", b"]"), st.binary(max_size=200))


def digest_challenge() -> st.SearchStrategy[str]:
    """A camera's ``WWW-Authenticate`` header (collectors/isapi.py: parse_challenge)."""
    good = 'Digest realm="IP Camera", qop="auth", nonce="4e6a", algorithm=MD5, opaque="x", stale=FALSE'
    parts = st.sampled_from(['realm="r"', "nonce=", 'qop="auth,auth-int"', "algorithm=SHA-256", '"', ",", "=", "a=b=c"])
    built = st.lists(parts, max_size=6).map(lambda ps: "Digest " + ", ".join(ps))
    return st.one_of(st.just(good), built, st.text(max_size=120))
