#!/bin/sh
# Installed by private-llm-infra's firewall role.
#
#   firewall-apply apply RULES_FILE TIMEOUT_S   validate, schedule a rollback, load RULES_FILE
#   firewall-apply confirm RULES_FILE           keep it: cancel the rollback, remember it as good
#
# Only the role's own table is touched (the rules file replaces that table and nothing else). If
# `confirm` does not come within TIMEOUT_S (the change cut off the operator), a transient systemd
# timer loads the last confirmed rules again and puts them back in place for the next boot.
set -eu

table="inet private_llm_firewall"
state_dir=/var/lib/private-llm-infra/firewall
unit=private-llm-infra-firewall-rollback
confirmed="$state_dir/confirmed.nft"
# The egress sets of freshly loaded rules are empty until their host names are resolved (after a
# rollback here; after an apply, by the play once it has confirmed).
refresh=/usr/local/sbin/private-llm-infra-egress-refresh

# One unit per systemctl call: a call naming a unit that is not loaded does nothing at all.
cancel_rollback() {
  for u in "$unit.timer" "$unit.service"; do
    systemctl stop "$u" >/dev/null 2>&1 || true
    systemctl reset-failed "$u" >/dev/null 2>&1 || true
  done
}

case "${1:-}" in
  apply)
    rules=$2
    timeout=$3
    mkdir -p "$state_dir"
    nft -c -f "$rules"
    cancel_rollback
    if [ "$timeout" -gt 0 ]; then
      if [ -f "$confirmed" ]; then
        restore="nft -f '$confirmed' && cp '$confirmed' '$rules' && { $refresh || true; }"
      else
        # Nothing confirmed yet: the way back is no table of ours at all.
        restore="nft delete table $table; cp /dev/null '$rules'"
      fi
      # AccuracySec: a transient timer may otherwise fire up to a minute late.
      systemd-run --quiet --unit="$unit" --on-active="${timeout}s" --timer-property=AccuracySec=1s \
        --description="Roll back the private-llm-infra firewall" /bin/sh -c "$restore"
    fi
    nft -f "$rules"
    ;;
  confirm)
    cancel_rollback
    mkdir -p "$state_dir"
    cp "$2" "$confirmed"
    ;;
  *)
    echo "usage: $0 apply RULES_FILE TIMEOUT_S | confirm RULES_FILE" >&2
    exit 2
    ;;
esac
