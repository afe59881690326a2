#!/usr/bin/env bash
# Set up examwatch on this machine and run one room agent against a local broker, in the foreground.
# Then, from another shell, open the secrecy-room door as its Zigbee sensor would:
#   mosquitto_pub -p 18830 -t zigbee2mqtt/secrecy-door -m '{"contact":false}'
# and watch the level-2 alarm in this log, on examwatch/v1/demo-site/secrecy/alarms and at
# http://127.0.0.1:9108/metrics (examwatch_alarm_active). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients
fi
python3 -m pip install -q --disable-pip-version-check -e .

state=.examwatch-demo
mkdir -p "$state"
chmod 700 "$state"
# this agent's signing key, made once and kept out of the config
[ -s "$state/agent.key" ] || (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > "$state/agent.key")
printf 'listener 18830 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/\n' \
  "$(pwd)/$state" > "$state/mosquitto.conf"
"$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$state/mosquitto.conf" &
broker=$!
trap 'kill $broker 2>/dev/null' EXIT
examwatch config check deploy/examples/room-demo.toml
exec_status=0
examwatch agent run --config deploy/examples/room-demo.toml || exec_status=$?
exit $exec_status
