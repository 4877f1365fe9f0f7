#!/bin/sh
# Installed by private-llm-infra's firewall role.
#
#   egress-refresh [HOSTS_FILE]
#
# Fills the egress sets of the firewall table with what each host name resolves to now: a mirror behind
# a CDN changes addresses, so the rules name sets, which this refreshes (at every rules load, at boot
# and on a timer). HOSTS_FILE lines: "SET_NAME HOST". One nft transaction for all sets; a name that
# does not resolve keeps its previous addresses.
set -eu

hosts_file=${1:-/etc/private-llm-infra/egress-hosts}
table="inet private_llm_firewall"
[ -s "$hosts_file" ] || exit 0
nft list table $table >/dev/null 2>&1 || exit 0

script=$(mktemp)
trap 'rm -f "$script"' EXIT
while read -r set host; do
  case $set in '' | '#'*) continue ;; esac
  v4=$(timeout 5 getent ahostsv4 "$host" | awk '{print $1}' | sort -u | paste -sd, -) || true
  v6=$(timeout 5 getent ahostsv6 "$host" | awk '$1 !~ /^::ffff:/ {print $1}' | sort -u | paste -sd, -) || true
  if [ -z "$v4$v6" ]; then
    echo "egress-refresh: $host does not resolve; $set keeps its addresses" >&2
    continue
  fi
  echo "flush set $table ${set}_v4" >>"$script"
  echo "flush set $table ${set}_v6" >>"$script"
  [ -z "$v4" ] || echo "add element $table ${set}_v4 { $v4 }" >>"$script"
  [ -z "$v6" ] || echo "add element $table ${set}_v6 { $v6 }" >>"$script"
done <"$hosts_file"
[ ! -s "$script" ] || nft -f "$script"
