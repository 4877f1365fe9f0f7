"""Verify the firewall with real packets between three containers."""

from __future__ import annotations

import os
import time

import pytest
import testinfra

PREFIX = os.environ.get("PLI_INSTANCE", "pli-firewall")
INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
GATEWAY_IP, NODE_IP = "172.29.77.10", "172.29.77.20"
TABLE = "inet private_llm_firewall"

testinfra_hosts = [f"ansible://{PREFIX}-gw", f"ansible://{PREFIX}-node"]


def machine(role: str):
    return testinfra.get_host(f"ansible://{PREFIX}-{role}", ansible_inventory=INVENTORY)


@pytest.fixture(scope="module")
def gateway():
    return machine("gw")


@pytest.fixture(scope="module")
def node():
    return machine("node")


@pytest.fixture(scope="module")
def outsider():
    return machine("outsider")


def can_connect(source, address: str, port: int) -> bool:
    probe = (
        "python3 -c \"import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\""
        f" {address} {port}"
    )
    return source.run(probe).rc == 0


def test_rules_are_loaded_and_persisted(host):
    assert host.run(f"nft list table {TABLE}").rc == 0
    assert host.service("nftables").is_enabled
    loaded_lines = [line.strip() for line in host.file("/etc/nftables.conf").content_string.splitlines()]
    assert not any(line.startswith("flush") for line in loaded_lines)


def test_outsider_cannot_reach_the_app_port(outsider):
    assert not can_connect(outsider, NODE_IP, 8000)


def test_gateway_reaches_the_app_port(gateway):
    assert can_connect(gateway, NODE_IP, 8000)


def test_outsider_reaches_the_gateway_on_443_and_80(outsider):
    assert can_connect(outsider, GATEWAY_IP, 443)
    assert can_connect(outsider, GATEWAY_IP, 80)


def test_gateway_does_not_expose_other_ports(outsider, gateway):
    gateway.run("systemctl start listener@8000.service")
    try:
        assert not can_connect(outsider, GATEWAY_IP, 8000)
    finally:
        gateway.run("systemctl stop listener@8000.service")


def test_ssh_only_from_allowed_cidrs(gateway, outsider):
    assert can_connect(gateway, NODE_IP, 22)
    assert not can_connect(outsider, NODE_IP, 22)


def test_published_container_port_is_filtered_like_a_host_port(gateway, outsider):
    # Traffic to a published port is DNATed to the container and never passes the input hook.
    assert can_connect(gateway, NODE_IP, 9100)
    assert not can_connect(outsider, NODE_IP, 9100)


def test_docker_rules_survive_a_firewall_reload(node, gateway):
    node.check_output("systemctl reload nftables || systemctl restart nftables")
    ruleset = node.check_output("nft list ruleset")
    assert "chain DOCKER" in ruleset
    assert "table inet private_llm_firewall" in ruleset
    # Docker's NAT still works for the allowed source.
    assert can_connect(gateway, NODE_IP, 9100)


def test_confirmed_apply_leaves_no_rollback_pending(host):
    assert host.run("systemctl is-active private-llm-infra-firewall-rollback.timer").stdout.strip() != "active"


def test_unconfirmed_apply_rolls_back(host):
    lockout = (
        "table inet private_llm_firewall\ndelete table inet private_llm_firewall\n"
        "table inet private_llm_firewall {\n chain input {\n  type filter hook input priority filter; policy drop;\n }\n}\n"
    )
    host.check_output(f"printf '{lockout}' > /tmp/lockout.nft")
    host.check_output("/usr/local/sbin/private-llm-infra-firewall-apply apply /tmp/lockout.nft 3")
    assert 'comment "ssh"' not in host.check_output(f"nft list table {TABLE}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and 'comment "ssh"' not in host.check_output(f"nft list table {TABLE}"):
        time.sleep(1)
    assert 'comment "ssh"' in host.check_output(f"nft list table {TABLE}")
    # The restored rules are also what the next boot loads.
    assert host.file("/tmp/lockout.nft").content_string == host.file(
        "/var/lib/private-llm-infra/firewall/confirmed.nft"
    ).content_string
