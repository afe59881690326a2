"""The ``examwatch`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys

from examwatch import __version__


def _config_check(path: str, gateway: bool) -> int:
    """The agent's or the gateway's file: read and checked exactly as ``run`` reads and checks it."""
    from examwatch.edge.config import ConfigError, read

    try:
        text = read(path)
        if gateway:
            from examwatch.gateway.config import loads as gateway_loads

            g = gateway_loads(text)
            summary = f"api {g.api.listen}, exporter {g.exporter.listen}, broker {g.broker.host}:{g.broker.port}"
        else:
            from examwatch.edge.config import loads

            cfg = loads(text)
            summary = f"{cfg.agent_id}, {len(cfg.devices)} devices"
    except OSError as err:
        print(f"{path}: cannot read: {err.strerror}", file=sys.stderr)
        return 2
    except ConfigError as err:
        sys.stderr.write(err.report(path))
        return 2
    print(f"{path}: ok ({summary})")
    return 0


def _agent_run(path: str, log_level: str) -> int:
    from examwatch.edge import logs
    from examwatch.edge.config import ConfigError, load
    from examwatch.edge.runtime import Agent

    logs.configure(log_level)
    try:
        cfg = load(path)
    except ConfigError as err:
        sys.stderr.write(err.report(path))
        return 2
    except OSError as err:
        print(f"{path}: cannot read: {err.strerror}", file=sys.stderr)
        return 2
    try:
        asyncio.run(Agent(cfg).run())
    except (OSError, ValueError, RuntimeError) as err:  # a key file missing, a port taken: say so, no traceback
        import structlog

        structlog.get_logger("examwatch.agent").error("agent_failed", error=f"{type(err).__name__}: {err}")
        return 1
    return 0


def _gateway_run(path: str, log_level: str) -> int:
    from examwatch.edge import logs

    try:
        from examwatch.gateway.main import run
    except ModuleNotFoundError as err:  # a room's install: the gateway's extra is not there
        print(f"the county gateway needs its extra: pip install 'examwatch[gateway]' ({err})", file=sys.stderr)
        return 2

    logs.configure(log_level)
    return run(path)


def _gateway_config(path: str):  # -> gateway.config.Config, imported late
    """The gateway config at ``path``, or None after printing every problem with it."""
    from examwatch.edge.config import ConfigError
    from examwatch.gateway import config as gwconfig

    try:
        return gwconfig.load(path)
    except ConfigError as err:
        sys.stderr.write(err.report(path))
    except OSError as err:
        print(f"{path}: cannot read: {err.strerror}", file=sys.stderr)
    return None


def _test_channel(path: str, name: str) -> int:
    import time

    from examwatch.channels.base import SendError
    from examwatch.gateway.notify.worker import test_channel

    cfg = _gateway_config(path)
    if cfg is None:
        return 2
    ch = next((c for c in cfg.channels if c.name == name), None)
    if ch is None:
        print(
            f"{path}: no channel named {name!r} (have: {', '.join(c.name for c in cfg.channels) or 'none'})",
            file=sys.stderr,
        )
        return 2
    try:
        test_channel(ch, cfg.gateway.county, time.time())
    except SendError as err:
        print(f"{name}: 发送失败 ({err})", file=sys.stderr)
        return 1
    print(f"{name}: 测试消息已送达（对方已确认）")
    return 0


def _ack(args: argparse.Namespace) -> int:
    """POST /api/v1/ack on the gateway; the id is tried as an alarm, then as an incident."""
    import json
    import os

    import httpx

    url, token = args.url, args.token or os.environ.get("EXAMWATCH_TOKEN", "")
    if args.config:
        cfg = _gateway_config(args.config)
        if cfg is None:
            return 2
        url = url or f"http://{cfg.api.listen}"
        token = token or cfg.api_token()
    if not url or not token:
        print(
            "需要网关地址和令牌：--url 与 --token（或环境变量 EXAMWATCH_TOKEN），或 --config 网关配置", file=sys.stderr
        )
        return 2
    kinds = ["incident"] if args.incident else ["alarm", "incident"]
    for kind in kinds:
        try:
            r = httpx.post(
                f"{url.rstrip('/')}/api/v1/ack",
                headers={"Authorization": f"Bearer {token}"},
                json={kind: args.id, "who": args.who, "note": args.note},
                timeout=10,
                trust_env=False,
            )
        except httpx.HTTPError as err:
            print(f"网关不可达：{type(err).__name__}", file=sys.stderr)
            return 1
        if r.status_code == 404 and kind != kinds[-1]:
            continue
        if r.status_code == 200:
            print(f"已确认 {args.id}（{args.who}）")
            return 0
        try:
            error = json.loads(r.content).get("error", "")
        except ValueError:
            error = ""
        print(f"确认失败：HTTP {r.status_code} {error}", file=sys.stderr)
        return 1
    return 1


def _report(args: argparse.Namespace) -> int:
    cfg = _gateway_config(args.config)
    if cfg is None:
        return 2
    from examwatch.gateway.records.cli import main as report

    return report(cfg, args)


def _site_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from examwatch.edge import siteplan

    host, _, port = args.broker.rpartition(":") if ":" in args.broker else (args.broker, "", "")
    tls = not args.no_tls
    try:
        number = int(port) if port else (8883 if tls else 1883)
        if not host or not 1 <= number <= 65535:
            raise ValueError
    except ValueError:
        print(f"--broker {args.broker!r}: expected HOST[:PORT]", file=sys.stderr)
        return 2
    try:
        roster = Path(args.roster).read_bytes()[: siteplan.ROSTER_MAX_BYTES + 1].decode("utf-8")
        schedule = Path(args.schedule).read_text(encoding="utf-8")[:1_000_000] if args.schedule else ""
        result = siteplan.plan(
            roster, Path(args.out), (host, number, tls), args.rotate, schedule, args.replicas, args.share_group
        )
    except (OSError, UnicodeDecodeError) as err:
        print(f"{args.roster}: {err}", file=sys.stderr)
        return 2
    except siteplan.PlanError as err:
        print(err, file=sys.stderr)
        return 2
    print(siteplan.summary(result, Path(args.out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="examwatch", description="考点设备监测：考场代理与县级网关")
    p.add_argument("--version", action="version", version=f"examwatch {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="the room agent").add_subparsers(dest="action", required=True)
    agent.add_parser("run", help="run the agent").add_argument("--config", required=True, help="agent TOML file")

    gateway = sub.add_parser("gateway", help="the county gateway").add_subparsers(dest="action", required=True)
    gateway.add_parser("run", help="run the gateway").add_argument("--config", required=True, help="gateway TOML file")
    test = gateway.add_parser("test-channel", help="send a test message through one [[channels]] entry now")
    test.add_argument("name")
    test.add_argument("--config", required=True, help="gateway TOML file")

    ack = sub.add_parser("ack", help="acknowledge an alarm or incident on the county gateway (stops escalation)")
    ack.add_argument("id")
    ack.add_argument("--who", required=True, help="who takes it (name)")
    ack.add_argument("--note", default="", help="what is being done")
    ack.add_argument("--incident", action="store_true", help="the id is an incident's")
    ack.add_argument("--url", default="", help="gateway API, e.g. http://127.0.0.1:8080")
    ack.add_argument("--token", default="", help="API token (default: $EXAMWATCH_TOKEN, or the --config's)")
    ack.add_argument("--config", default="", help="gateway TOML file: its API address and token")
    gateway.add_parser(
        "hash-password", help="read a desk user's password (tty: asked twice; else stdin) and print its hash"
    )
    gateway_config = gateway.add_parser("config", help="gateway configuration")
    gateway_config.add_subparsers(dest="what", required=True).add_parser(
        "check", help="validate a file (- for stdin): exit 0 ok, 2 with every error"
    ).add_argument("file")

    report = sub.add_parser(
        "report", help="the plans' records (一级响应处置记录表, 首报/续报/终报, ...) as PDF or DOCX"
    )
    report.add_argument("--config", required=True, help="gateway TOML file: its state_dir and time zone")
    scope = report.add_mutually_exclusive_group(required=True)
    scope.add_argument("--incident", help="an incident's or an alarm's id (forms l1, first, followup, final)")
    scope.add_argument("--day", help="YYYY-MM-DD, the exam day (forms county, school, day)")
    scope.add_argument("--verify", metavar="FILE", help="was this file issued by the gateway, unchanged?")
    report.add_argument("--form", choices=["l1", "first", "followup", "final", "county", "school", "day"])
    report.add_argument("--out", help="the file to write: .pdf or .docx")
    report.add_argument("--who", default="", help="who makes it (default: the login name)")

    demo = sub.add_parser("demo", help="a whole exam site on this machine, with a scripted morning of faults")
    demo.add_argument("--dir", default=".examwatch-demo", help="where logs and databases go")
    demo.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (default: Ctrl-C)")
    demo.add_argument("--no-scenario", action="store_true", help="start the site, cause no faults")

    check = sub.add_parser("check", help="pre-exam readiness: poll every device, run the rules, check the uplink")
    check.add_argument("--config", required=True, help="agent TOML file")
    check.add_argument("--wait", type=float, default=15.0, help="seconds to wait for MQTT sensors")
    check.add_argument("--json", action="store_true", help="one JSON document instead of the table")

    config = sub.add_parser("config", help="agent configuration").add_subparsers(dest="action", required=True)
    config.add_parser("sample", help="print a complete commented sample")
    config.add_parser("check", help="validate a file (- for stdin): exit 0 ok, 2 with every error").add_argument("file")

    site = sub.add_parser("site", help="a county's rooms from one roster").add_subparsers(dest="action", required=True)
    site_plan = site.add_parser(
        "plan", help="every agent config and key, the county broker's users and roles, the gateway roster"
    )
    site_plan.add_argument("roster", help="CSV: site,room,kind,site_name,room_name,pi_host,devices (docs/deploy.md)")
    site_plan.add_argument("--out", required=True, help="folder for the files (kept keys are read back from it)")
    site_plan.add_argument("--broker", required=True, help="the county broker as the rooms reach it: HOST[:PORT]")
    site_plan.add_argument("--no-tls", action="store_true", help="plain MQTT (a test bench only; default TLS)")
    site_plan.add_argument(
        "--replicas", type=int, default=1, help="gateway replicas: broker users examwatch-gateway, -2 ... -N"
    )
    site_plan.add_argument(
        "--share-group", default="", help="the replicas' [broker] share_group (default: kept in county/share-group)"
    )
    site_plan.add_argument("--rotate", default="", metavar="SITE/ROOM", help="give this room a new signing key")
    site_plan.add_argument(
        "--schedule", default="", help="a TOML file with the county's [schedule], put in every config"
    )

    discover = sub.add_parser("discover", help="find this room's devices and write a config draft")
    from examwatch.edge.discover.run import add_arguments

    add_arguments(discover)

    args = p.parse_args(argv)
    if args.command == "discover":
        from examwatch.edge.discover.run import main as discover_main

        return discover_main(args)
    if args.command == "site":
        return _site_plan(args)
    if args.command == "config" and args.action == "sample":
        from examwatch.edge.config import sample_text

        sys.stdout.write(sample_text())
        return 0
    if args.command == "config":
        return _config_check(args.file, gateway=False)
    if args.command == "gateway" and args.action == "config":
        return _config_check(args.file, gateway=True)
    if args.command == "demo":
        from examwatch.simulators.demo import main as demo_main

        return demo_main(args.dir, args.duration, not args.no_scenario)
    if args.command == "check":
        from examwatch.edge import logs
        from examwatch.edge.readiness import main as readiness

        logs.configure("error", stream="stderr")  # the report says what the collectors would log
        return readiness(args.config, args.wait, args.json)
    if args.command == "agent":
        return _agent_run(args.config, args.log_level)
    if args.command == "ack":
        return _ack(args)
    if args.command == "report":
        return _report(args)
    if args.action == "hash-password":
        from examwatch.gateway.auth import hash_password_cli

        return hash_password_cli()
    if args.action == "test-channel":
        return _test_channel(args.config, args.name)
    return _gateway_run(args.config, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
