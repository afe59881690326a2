#!/usr/bin/env bash
# Set up examwatch on this machine (Debian or Raspberry Pi OS) and run the demo site in the foreground:
# a county broker and gateway, a secrecy room and two exam rooms with simulated devices, and a scripted
# morning of faults (mains lost, two rooms' network down, the secrecy-room door opened). It prints where
# to look (gateway API, Prometheus endpoints, MQTT topics). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real servers the demo's devices and the county need: mosquitto, socat pty pairs, NUT's upsd and drivers.
need=()
for p in mosquitto mosquitto-clients socat nut-server; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
python3 -c "import ensurepip, venv" 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Its own virtual environment (.venv/): Debian's Python refuses system-wide pip installs (PEP 668).
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[demo]"

exec .venv/bin/python -m examwatch demo --dir .examwatch-demo "$@"
