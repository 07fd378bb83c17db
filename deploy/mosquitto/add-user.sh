#!/usr/bin/env bash
# Add or update an edgerun user in the Mosquitto password file.
#   deploy/mosquitto/add-user.sh NAME [PASSWORD] [PASSWORD_FILE]
# NAME is a node id for an agent, or edgerun-bridge / edgerun-scheduler.
# Without PASSWORD one is generated and printed once.
set -euo pipefail
name=${1:?usage: add-user.sh NAME [PASSWORD] [PASSWORD_FILE]}
password=${2:-$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')}
file=${3:-/etc/mosquitto/edgerun.passwd}
command -v mosquitto_passwd >/dev/null || {
    echo "add-user.sh: mosquitto_passwd not found: apt-get install mosquitto" >&2; exit 2; }
if ! [[ $name =~ ^[A-Za-z0-9_:-]{1,128}$ ]]; then
    echo "add-user.sh: $name is not a valid node id (1-128 of A-Z a-z 0-9 _ : -)" >&2
    exit 2
fi
[ -f "$file" ] || { touch "$file"; chmod 600 "$file"; }
mosquitto_passwd -b "$file" "$name" "$password"
[ -n "${2:-}" ] || echo "$name $password"
