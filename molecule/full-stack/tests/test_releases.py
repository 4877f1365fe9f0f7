"""playbooks/upgrade.yml while clients ask through the gateway: a canary that fails is rolled back and stops
the rollout before the other node; a release rolls over both nodes, canary first, each answering before the
next; -e rollback=true returns both to the release before.

After test_full_stack.py, whose last test leaves both nodes on a release the inventory does not describe
(the one the rollback here returns to), and before test_rotation.py, whose rotations leave the vault behind
the nodes (a play of the whole role would then refuse the signing keys).
"""

from __future__ import annotations

import json
import posixpath

from stack import NODES, clients_asking, machine, run_playbook

testinfra_hosts = ["ansible://pli-stack-gw"]

CANARY, OTHER = sorted(NODES)  # the inventory's order: serial's first batch is the first node
BROKEN_MODEL = "/srv/private-llm/app/models/broken"  # a folder without a model: it never loads


def live_release(node: str) -> str:
    return posixpath.basename(machine(node).check_output("readlink /opt/private-llm/current"))


def previous_release(node: str) -> str:
    return posixpath.basename(machine(node).check_output("readlink /opt/private-llm/previous"))


def releases(node: str) -> set[str]:
    return set(machine(node).check_output("ls /opt/private-llm/releases").split())


def folded(result) -> str:
    """Ansible's output, its YAML-folded messages made one line; task errors go to stderr."""
    return " ".join((result.stdout + result.stderr).split())


def test_a_canary_that_fails_is_rolled_back_and_the_rollout_stops_before_the_other_node(client):
    for node in NODES:
        machine(node).check_output(f"mkdir -p {BROKEN_MODEL}")
    live = {node: live_release(node) for node in NODES}
    previous = {node: previous_release(node) for node in NODES}
    kept = {node: releases(node) for node in NODES}
    broken = {"inference_app_model_source": "path", "inference_app_model_path": BROKEN_MODEL}
    with clients_asking(client) as (answered, errors):
        result = run_playbook("playbooks/upgrade.yml", "-e", json.dumps(broken))
    assert result.returncode != 0, result.stdout[-4000:]
    assert errors == [], errors[:5]
    print(f"{len(answered)} requests answered during the failed canary, none failed")
    assert f"failed to load its model; rolled back to {live[CANARY]}, which is ready again" in folded(result)
    assert {node: live_release(node) for node in NODES} == live
    assert previous_release(CANARY) == previous[CANARY], "the rollback put back which release was before"
    assert OTHER not in result.stdout, "the rollout went past the canary"
    assert releases(OTHER) == kept[OTHER]


def test_a_release_rolls_over_both_nodes_canary_first_and_a_rollback_returns_both(client):
    """The inventory's own release (the one converge made, kept on disk) replaces the live one on the canary,
    which answers, then on the other node; -e rollback=true brings back the release before on both."""
    before = {node: live_release(node) for node in NODES}
    with clients_asking(client) as (answered, errors):
        upgraded = run_playbook("playbooks/upgrade.yml")
    assert upgraded.returncode == 0, upgraded.stdout[-4000:] + upgraded.stderr[-2000:]
    assert errors == [], errors[:5]
    after = {node: live_release(node) for node in NODES}
    assert all(after[node] != before[node] for node in NODES), (before, after)
    output = folded(upgraded)
    answers = [output.index(f"Release {after[node]} on {node} answers:") for node in (CANARY, OTHER)]
    assert answers == sorted(answers), "the other node was upgraded before the canary answered"
    assert {node: previous_release(node) for node in NODES} == before
    print(f"{len(answered)} requests answered during the upgrade, none failed")

    with clients_asking(client) as (answered, errors):
        rolled_back = run_playbook("playbooks/upgrade.yml", "-e", "rollback=true")
    assert rolled_back.returncode == 0, rolled_back.stdout[-4000:] + rolled_back.stderr[-2000:]
    assert errors == [], errors[:5]
    print(f"{len(answered)} requests answered during the rollback, none failed")
    assert {node: live_release(node) for node in NODES} == before
    assert {node: previous_release(node) for node in NODES} == after
    for node in NODES:
        assert f"Release {before[node]} on {node} answers:" in folded(rolled_back)
