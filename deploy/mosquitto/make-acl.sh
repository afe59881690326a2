#!/bin/sh
# The county broker's ACL, made from the gateway's keys file (lines "<site>/<room> <hex key>"):
#
#   sh deploy/mosquitto/make-acl.sh [--replicas N] /etc/examwatch/agent-keys > /etc/mosquitto/examwatch.acl
#   systemctl reload mosquitto          # rerun both whenever a room is added or removed
#
# Each room's user "<site>-<room>" may publish under its own topics only and read nothing; the gateway's
# user (second argument, default examwatch-gateway) reads everything, and so do its replicas' users with
# --replicas N (docs/scaling.md): "<gateway>-2" ... "<gateway>-N", the first replica being the gateway's own
# user. Reading is all a replica needs, its shared subscription ($share/<group>/examwatch/v1/...) included.
# mosquitto refuses %u patterns for names containing "/", hence one explicit block per room. Two rooms
# mapping to one user name (site "a-b" room "c" and site "a" room "b-c"), or a room named like the gateway
# or a replica, is an error: they could speak for each other, and nothing is written.
set -eu
replicas=1
if [ "${1:-}" = "--replicas" ]; then
  replicas=${2:?--replicas N: the number of gateway replicas}
  shift 2
fi
case $replicas in
  '' | *[!0-9]* | 0*) echo "--replicas $replicas: expected 1 to 64" >&2; exit 2 ;;
esac
if [ "$replicas" -gt 64 ]; then echo "--replicas $replicas: expected 1 to 64" >&2; exit 2; fi
keys=${1:?usage: make-acl.sh [--replicas N] KEYS_FILE [GATEWAY_USER]}
gateway=${2:-examwatch-gateway}
awk -v gw="$gateway" -v replicas="$replicas" '
  BEGIN {
    gateways[1] = gw; reader[gw] = 1
    for (i = 2; i <= replicas; i++) { gateways[i] = gw "-" i; reader[gw "-" i] = i }
  }
  { sub(/#.*/, "") }
  NF == 0 { next }
  NF != 2 || $1 !~ /^[A-Za-z0-9_-]+\/[A-Za-z0-9_-]+$/ {
    printf "%s line %d: expected <site>/<room> <hex key>\n", FILENAME, FNR > "/dev/stderr"; bad = 1; next }
  {
    split($1, a, "/"); user = a[1] "-" a[2]
    if (user in reader || user in owner) {
      printf "%s line %d: %s would log in as %s, like %s\n", FILENAME, FNR, $1, user,
             (user in reader ? (reader[user] == 1 ? "the gateway" : "gateway replica " reader[user]) : owner[user]) > "/dev/stderr"
      bad = 1; next }
    owner[user] = $1
    acl = acl sprintf("user %s\ntopic write examwatch/v1/%s/#\n\n", user, $1)
  }
  END {
    if (bad) exit 1
    printf "%s", acl
    for (i = 1; i <= replicas; i++) printf "%suser %s\ntopic read examwatch/v1/#\n", (i > 1 ? "\n" : ""), gateways[i]
  }' "$keys"
