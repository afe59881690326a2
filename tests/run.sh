#!/usr/bin/env bash
# The test command: README's second command, and exactly what .ci/run runs. Extra arguments go to pytest
# (e.g. `bash tests/run.sh tests/test_nut.py -x`).
#
# 1. installs the real servers the fixtures start (mosquitto, net-snmp tools, socat pty pairs, NUT,
#    Prometheus and promtool, Alertmanager, faketime, systemd's tools, PostgreSQL) when missing: needs root or sudo on a fresh machine;
# 2. builds a fresh virtual environment (.venv-test/) with `pip install -e '.[test]'`, so the tests see
#    only what pyproject.toml declares and an undeclared dependency fails here, not on a Raspberry Pi;
#    it is rebuilt whenever pyproject.toml or the Python changes (a clean CI checkout always builds it);
# 3. runs pytest with that environment's Python (subprocesses started with sys.executable use it too).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(mosquitto mosquitto-clients snmp socat nut-server nut-client prometheus prometheus-alertmanager faketime
              systemd chromium postgresql)
# the records (gateway/records): WeasyPrint's Pango, the CJK fonts, pdftotext/pdffonts/pdftoppm for the tests
apt_packages+=(libpango-1.0-0 libpangoft2-1.0-0 fonts-noto-cjk poppler-utils)
python3 -c "import ensurepip, venv" 2>/dev/null || apt_packages+=(python3-venv)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}" >&2
  sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv=.venv-test
stamp="$(sha256sum pyproject.toml | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version.split()[0], sys.prefix)')"
if [ "$(cat "$venv/.built-from" 2>/dev/null)" != "$stamp" ]; then
  echo "tests/run.sh: building a fresh $venv from pyproject.toml" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
  echo "$stamp" >"$venv/.built-from"
fi

exec "$venv/bin/python" -m pytest -q "$@"
