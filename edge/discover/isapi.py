"""ISAPI discovery: cameras and NVRs given with their login (``host:user:passwordfile``), asked for their
storage by the agent's own collector with each isapi profile in rank order (digest auth); the first that
reads the device is its profile."""

from __future__ import annotations

from examwatch.collectors.base import public_address
from examwatch.edge.discover import ERROR, OK, Found, offered, trial


def parse_target(text: str) -> tuple[str, str, str]:
    """``host[:port]:user:passwordfile`` (a URL's ``scheme://`` allowed) -> (address, user, password file)."""
    address, user, password_file = text.rsplit(":", 2) if text.count(":") >= 2 else ("", "", "")
    if not address or not user or not password_file:
        raise ValueError(f"--isapi {public_address(text)[:80]!r}: expected host[:port]:user:passwordfile")
    return address, user, password_file


async def probe(targets: list[tuple[str, str, str]], timeout: float) -> list[Found]:
    rows = []
    candidates = offered("isapi")
    for address, user, password_file in targets:
        device = {"protocol": "isapi", "address": address, "username": user, "password_file": password_file}
        shown = public_address(address)
        failed, chosen, readings = [], "", []
        for name, _ in candidates:
            t = await trial({**device, "kind": "camera", "profile": name, "timeout": timeout, "retries": 0})
            if t.ok:
                chosen, readings = name, t.readings
                break
            failed.append(f"{name}: {t.reason}")
            if t.reason in ("http_401", "unreachable", "timeout"):  # another path will not change that
                break
        if not chosen:
            rows.append(Found("isapi", shown, ERROR, f"存储信息读不到（{'，'.join(failed) or '无 isapi profile'}）"))
            continue
        disks = sorted({r.device.split("/", 1)[1] for r in readings if "/" in r.device})
        kind = "nvr" if len(disks) > 1 or any(d.startswith("nas") for d in disks) else "camera"
        notes = ("按硬盘数判断为" + ("录像机" if kind == "nvr" else "摄像机（单个存储卡）") + "：请核对 kind",)
        why = f"ISAPI 存储应答（{chosen}）：{', '.join(disks) or '无硬盘'}"
        rows.append(
            Found("isapi", shown, OK, why, kind, chosen, "", {**device, "kind": kind, "profile": chosen}, notes)
        )
    return rows


__all__ = ["parse_target", "probe"]
