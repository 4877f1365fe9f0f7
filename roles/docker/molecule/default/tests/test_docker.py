"""Verify the docker role on a docker-in-docker systemd container."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def info(host):
    return json.loads(host.check_output("docker info --format '{{json .}}'"))


def test_engine_is_running_and_enabled(host):
    service = host.service("docker")
    assert service.is_running
    assert service.is_enabled
    assert host.package("docker.io").is_installed


def test_daemon_json_holds_role_settings_and_operator_options(host):
    daemon = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert daemon["registry-mirrors"] == ["https://mirror.example.internal"]
    # docker_daemon_options merges recursively: its compress key joins the role's rotation keys.
    assert daemon["log-opts"] == {"max-size": "20m", "max-file": "3", "compress": "true"}
    assert daemon["live-restore"] is True
    assert daemon["default-address-pools"] == [{"base": "172.30.0.0/16", "size": 24}]


def test_running_engine_uses_the_configuration(info):
    assert info["LoggingDriver"] == "json-file"
    assert info["LiveRestoreEnabled"] is True
    assert "https://mirror.example.internal/" in info["RegistryConfig"]["Mirrors"]
    assert info["Driver"] == "overlay2"


def test_engine_started_once(host):
    # The first start read the rendered daemon.json: converging a fresh host must not restart it.
    starts = host.check_output("journalctl -u docker.service -o cat | grep -c 'Daemon has completed initialization'")
    assert int(starts) == 1


def test_locally_imported_image_runs_a_container(host):
    host.check_output(
        "rm -rf /tmp/rootfs && mkdir -p /tmp/rootfs/bin && cp /bin/busybox /tmp/rootfs/bin/busybox"
        " && tar -C /tmp/rootfs -c . | docker import - pli-verify/busybox:latest"
    )
    out = host.check_output("docker run --rm pli-verify/busybox:latest /bin/busybox echo hello-from-container")
    assert out == "hello-from-container"


def test_new_networks_come_from_the_configured_pool(host):
    host.run("docker network rm pli-verify-net")
    host.check_output("docker network create pli-verify-net")
    try:
        subnet = host.check_output("docker network inspect pli-verify-net --format '{{(index .IPAM.Config 0).Subnet}}'")
    finally:
        host.run("docker network rm pli-verify-net")
    assert subnet.startswith("172.30.")


def test_checker_rejects_a_broken_daemon_json(host):
    host.check_output("""printf '{"log-opts": {"max-file": 3}}' > /tmp/bad-daemon.json""")
    result = host.run("/usr/local/libexec/private-llm-infra/check-docker-daemon-json /tmp/bad-daemon.json")
    assert result.rc == 1
    assert "log-opts values must be strings" in result.stderr
