"""playbooks/upgrade.yml while clients ask through the gateway: a canary that fails is rolled back and stops
the rollout before the other node; -e rollback=true returns both, canary first, to the release before.

After test_full_stack.py, whose last test leaves both nodes on a release the inventory does not describe
(the rollback here returns them to the inventory's), and before test_rotation.py, whose rotations leave the vault behind
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


def test_a_rollback_returns_both_nodes_to_the_release_before_canary_first(client):
    """-e rollback=true: each node goes back to the release it ran before its last switch (the inventory's,
    from the converge), the canary first and answering before the other node moves; the release it left
    becomes the one a second rollback would return to. (The way forward is the same switch: site.yml's
    rolling change in test_full_stack.py and the canary above.)"""
    before = {node: live_release(node) for node in NODES}
    previous = {node: previous_release(node) for node in NODES}
    with clients_asking(client) as (answered, errors):
        rolled_back = run_playbook("playbooks/upgrade.yml", "-e", "rollback=true")
    assert rolled_back.returncode == 0, rolled_back.stdout[-4000:] + rolled_back.stderr[-2000:]
    assert errors == [], errors[:5]
    print(f"{len(answered)} requests answered during the rollback, none failed")
    assert {node: live_release(node) for node in NODES} == previous
    assert {node: previous_release(node) for node in NODES} == before
    output = folded(rolled_back)
    answers = [output.index(f"Release {previous[node]} on {node} answers:") for node in (CANARY, OTHER)]
    assert answers == sorted(answers), "the other node went back before the canary answered"
