"""The duty desk's log-in: users from the gateway config, argon2 password hashes, server-side sessions,
CSRF tokens and roles. Pure apart from the clock passed in (and argon2's work).

A session is a random id in an HttpOnly, SameSite=Strict cookie; the server keeps (user, role, CSRF token,
expiry) in memory (a restart logs everyone out). Every state-changing desk request carries the session's
CSRF token in the X-CSRF-Token header, compared in constant time. Log-in attempts are limited per user
name (known or not): after FAIL_MAX failures within FAIL_WINDOW the name is refused until the window has
passed. Passwords and hashes are never logged.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Annotated, Literal

import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from examwatch.kernel.config import Strict

ROLES = ("viewer", "duty", "admin")
Role = Literal["viewer", "duty", "admin"]
# What each role may do beyond reading (the viewer reads only).
MAY = {
    "viewer": frozenset(),
    "duty": frozenset({"ack", "note", "close", "report"}),
    "admin": frozenset({"ack", "note", "close", "report", "admin"}),
}
COOKIE = "examwatch_desk"
SESSION_SECONDS = 12 * 3600.0  # an exam day's shift
MAX_SESSIONS = 256  # the oldest goes first
FAIL_MAX = 5  # failed log-ins per user name within FAIL_WINDOW
FAIL_WINDOW = 300.0
MAX_NAMES = 1024  # user names whose failures are remembered (an attacker's made-up names evict each other)
_hasher = PasswordHasher()
_DUMMY = _hasher.hash("examwatch: a name that is not a user costs the same time as one that is")


class User(Strict, kw_only=True):
    """One ``[[api.users]]`` entry."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    role: Role = "viewer"
    password_hash: Annotated[str, msgspec.Meta(pattern=r"^\$argon2(id|i|d)\$", max_length=512)]


class Session(msgspec.Struct, kw_only=True):
    user: str
    role: str
    csrf: str
    expires: float


class RateLimited(Exception):
    """Too many failed log-ins for this user name: try again later."""


def hash_password(password: str) -> str:
    """The argon2id hash to put in ``[[api.users]] password_hash``."""
    return _hasher.hash(password)


def hash_password_cli() -> int:
    """``examwatch gateway hash-password``: the password from the terminal (twice) or stdin's first line."""
    import getpass
    import sys

    if sys.stdin.isatty():
        password = getpass.getpass("密码：")
        if getpass.getpass("再输入一次：") != password:
            print("两次输入的密码不一致", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        print("密码至少 8 个字符", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


class Auth:
    """The configured users and the open sessions (thread-safe: the API's worker threads share it)."""

    def __init__(self, users: Iterable[User]) -> None:
        self.users = {u.name: u for u in users}
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._fails: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def login(self, name: str, password: str, now: float) -> tuple[str, Session] | None:
        """(session id, session) for the right password, None for a wrong one; RateLimited past FAIL_MAX."""
        with self._lock:
            recent = [t for t in self._fails.get(name, []) if now - t < FAIL_WINDOW]
            if len(recent) >= FAIL_MAX:
                raise RateLimited(name)
        user = self.users.get(name)
        try:
            ok = _hasher.verify(user.password_hash if user else _DUMMY, password) and user is not None
        except (VerificationError, InvalidHashError):
            ok = False
        with self._lock:
            if not ok or user is None:
                self._fails[name] = [*recent, now]
                self._fails.move_to_end(name)
                while len(self._fails) > MAX_NAMES:
                    self._fails.popitem(last=False)
                return None
            self._fails.pop(name, None)
            sid = secrets.token_urlsafe(32)
            session = Session(
                user=user.name, role=user.role, csrf=secrets.token_urlsafe(32), expires=now + SESSION_SECONDS
            )
            self._sessions[sid] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
            return sid, session

    def session(self, sid: str | None, now: float) -> Session | None:
        if not sid:
            return None
        with self._lock:
            s = self._sessions.get(sid)
            if s is not None and now >= s.expires:
                del self._sessions[sid]
                return None
            return s

    def logout(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)


def csrf_ok(session: Session, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), session.csrf.encode())


def may(session: Session, action: str) -> bool:
    return action in MAY.get(session.role, frozenset())


__all__ = [
    "COOKIE",
    "ROLES",
    "Auth",
    "RateLimited",
    "Session",
    "User",
    "csrf_ok",
    "hash_password",
    "hash_password_cli",
    "may",
]
