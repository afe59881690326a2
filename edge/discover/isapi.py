"""ISAPI discovery: cameras and NVRs given with their login (``host:user:passwordfile``), each asked for
its storage document with digest auth by the agent's own collector."""

from __future__ import annotations

from examwatch.collectors.base import public_address
from examwatch.edge.discover import ERROR, OK, Found, trial


def parse_target(text: str) -> tuple[str, str, str]:
    """``host[:port]:user:passwordfile`` (a URL's ``scheme://`` allowed) -> (address, user, password file)."""
    address, user, password_file = text.rsplit(":", 2) if text.count(":") >= 2 else ("", "", "")
    if not address or not user or not password_file:
        raise ValueError(f"--isapi {public_address(text)[:80]!r}: expected host[:port]:user:passwordfile")
    return address, user, password_file


async def probe(targets: list[tuple[str, str, str]], timeout: float) -> list[Found]:
    rows = []
    for address, user, password_file in targets:
        device = {"protocol": "isapi", "address": address, "username": user, "password_file": password_file}
        t = await trial({**device, "kind": "camera", "timeout": timeout, "retries": 0})
        shown = public_address(address)
        if not t.ok:
            rows.append(Found("isapi", shown, ERROR, f"存储信息读不到：{t.reason} {t.detail[:80]}".strip()))
            continue
        disks = sorted({r.device.split("/", 1)[1] for r in t.readings if "/" in r.device})
        kind = "nvr" if len(disks) > 1 or any(d.startswith("nas") for d in disks) else "camera"
        notes = ("按硬盘数判断为" + ("录像机" if kind == "nvr" else "摄像机（单个存储卡）") + "：请核对 kind",)
        why = f"ISAPI 存储应答：{', '.join(disks) or '无硬盘'}"
        rows.append(Found("isapi", shown, OK, why, kind, "", "", {**device, "kind": kind}, notes))
    return rows


__all__ = ["parse_target", "probe"]
