#!/bin/sh
# The county broker's ACL, made from the gateway's keys file (lines "<site>/<room> <hex key>"):
#
#   sh deploy/mosquitto/make-acl.sh /etc/examwatch/agent-keys > /etc/mosquitto/examwatch.acl
#   systemctl reload mosquitto          # rerun both whenever a room is added or removed
#
# Each room's user "<site>-<room>" may publish under its own topics only and read nothing; the gateway's
# user (second argument, default examwatch-gateway) reads everything. mosquitto refuses %u patterns for
# names containing "/", hence one explicit block per room. Two rooms mapping to one user name (site "a-b"
# room "c" and site "a" room "b-c"), or a room named like the gateway, is an error: they could speak
# for each other, and nothing is written.
set -eu
keys=${1:?usage: make-acl.sh KEYS_FILE [GATEWAY_USER]}
gateway=${2:-examwatch-gateway}
awk -v gw="$gateway" '
  { sub(/#.*/, "") }
  NF == 0 { next }
  NF != 2 || $1 !~ /^[A-Za-z0-9_-]+\/[A-Za-z0-9_-]+$/ {
    printf "%s line %d: expected <site>/<room> <hex key>\n", FILENAME, FNR > "/dev/stderr"; bad = 1; next }
  {
    split($1, a, "/"); user = a[1] "-" a[2]
    if (user == gw || user in owner) {
      printf "%s line %d: %s would log in as %s, like %s\n", FILENAME, FNR, $1, user,
             (user == gw ? "the gateway" : owner[user]) > "/dev/stderr"; bad = 1; next }
    owner[user] = $1
    acl = acl sprintf("user %s\ntopic write examwatch/v1/%s/#\n\n", user, $1)
  }
  END { if (bad) exit 1; printf "%suser %s\ntopic read examwatch/v1/#\n", acl, gw }' "$keys"
