#!/usr/bin/env bash
# Install examwatch as a systemd service on a Raspberry Pi (Debian/Raspberry Pi OS), as root.
#   sudo bash deploy/systemd/install.sh agent     # a room agent
#   sudo bash deploy/systemd/install.sh gateway   # the county gateway
set -euo pipefail
role=${1:?usage: install.sh agent|gateway}
here=$(cd "$(dirname "$0")/../.." && pwd)

python3 -m venv /opt/examwatch
extra=""; [ "$role" = gateway ] && extra="[gateway]"  # the rooms' Pis install no web side
/opt/examwatch/bin/pip install -q "$here$extra"
ln -sf /opt/examwatch/bin/examwatch /usr/local/bin/examwatch
id examwatch >/dev/null 2>&1 || useradd --system --home /var/lib/examwatch --shell /usr/sbin/nologin examwatch
install -d -m 0750 -o root -g examwatch /etc/examwatch
if [ "$role" = agent ] && [ ! -e /etc/examwatch/agent.toml ]; then
  examwatch config sample > /etc/examwatch/agent.toml
  chmod 0640 /etc/examwatch/agent.toml; chgrp examwatch /etc/examwatch/agent.toml
  echo "edit /etc/examwatch/agent.toml (site, room, devices, schedule), then: systemctl restart examwatch-agent"
fi
install -m 0644 "$here/deploy/systemd/examwatch-$role.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now "examwatch-$role.service"
