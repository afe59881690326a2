"""The ``examwatch`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys

from examwatch import __version__


def _config_check(path: str) -> int:
    from examwatch.edge.config import ConfigError, loads

    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as err:
        print(f"{path}: cannot read: {err.strerror}", file=sys.stderr)
        return 2
    try:
        cfg = loads(text)
    except ConfigError as err:
        sys.stderr.write(err.report(path))
        return 2
    print(f"{path}: ok ({cfg.agent_id}, {len(cfg.devices)} devices)")
    return 0


def _agent_run(path: str, log_level: str) -> int:
    # sqlite-utils imports numpy whenever it is installed, only to convert numpy scalars, which the agent
    # never stores: ~12 MB of a Pi agent's 50 MB budget. Only this process is spared it, never a library user.
    sys.modules.setdefault("numpy", None)  # type: ignore[arg-type]
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
    from examwatch.gateway.main import run

    logs.configure(log_level)
    return run(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="examwatch", description="考点设备监测：考场代理与县级网关")
    p.add_argument("--version", action="version", version=f"examwatch {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="the room agent").add_subparsers(dest="action", required=True)
    agent.add_parser("run", help="run the agent").add_argument("--config", required=True, help="agent TOML file")

    gateway = sub.add_parser("gateway", help="the county gateway").add_subparsers(dest="action", required=True)
    gateway.add_parser("run", help="run the gateway").add_argument("--config", required=True, help="gateway TOML file")

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

    args = p.parse_args(argv)
    if args.command == "config" and args.action == "sample":
        from examwatch.edge.config import sample_text

        sys.stdout.write(sample_text())
        return 0
    if args.command == "config":
        return _config_check(args.file)
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
    return _gateway_run(args.config, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
