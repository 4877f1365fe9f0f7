"""Every role's meta/argument_specs.yml rejects wrong input before the role touches a host.

The play runs against localhost with a local connection; after reading the minimal facts, argument
validation is the role's first task, so a rejected value ends the play before any change.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(p.parent.parent.name for p in REPO.glob("roles/*/meta/argument_specs.yml"))

MONITORING_PORTS = {
    "app": 8000,
    "node_exporter": 9100,
    "nginx_exporter": 9113,
    "nginx_status": 8089,
    "nginx_log_exporter": 3903,
    "postgres_exporter": 9187,
    "redis_exporter": 9121,
}
BAD_INPUT = [
    ("docker", {"docker_source": "snap"}, "docker_source must be one of: distro, docker_ce"),
    ("docker", {"docker_log_max_file": "many"}, "argument 'docker_log_max_file' is of type str"),
    ("docker", {"docker_default_address_pools": [{"base": "10.9.0.0/16"}]}, "missing required arguments: size"),
    ("nvidia_driver", {"nvidia_driver_source": "runfile"}, "nvidia_driver_source must be one of: debian, ubuntu, cuda"),
    ("nvidia_driver", {"nvidia_driver_reboot": "sometimes"}, "argument 'nvidia_driver_reboot' is of type str"),
    (
        "nvidia_container_toolkit",
        {"nvidia_container_toolkit_cdi": "yes-please"},
        "nvidia_container_toolkit_cdi must be one of",
    ),
    ("nginx", {"nginx_tls_protocols": ["TLSv1"]}, "nginx_tls_protocols must be one or more of: TLSv1.2, TLSv1.3"),
    ("certbot", {"certbot_mode": "manual"}, "certbot_mode must be one of: acme, selfsigned, provided"),
    ("firewall", {"firewall_host_rules": [{"port": 22, "proto": "sctp"}]}, "proto must be one of: tcp, udp"),
    ("luks", {"luks_volumes": [{"name": "data", "device": "/dev/sdb"}]}, "missing required arguments: mount_point"),
    ("luks", {"luks_pbkdf": "md5"}, "luks_pbkdf must be one of: argon2id, argon2i, pbkdf2"),
    ("base", {"base_sysctl_apply": "maybe"}, "argument 'base_sysctl_apply' is of type str"),
    ("inference_app", {"inference_app_runtime": "podman"}, "inference_app_runtime must be one of: systemd, docker"),
    # The shared address and port convention comes from group_vars/all: without it a role stops at once.
    ("redis", {}, "missing required arguments: pli_address, pli_ports"),
    (
        "firewall",
        {"pli_address": "192.0.2.10", "pli_ports": {"app": 8000}},
        "missing required arguments: postgresql, redis",
    ),
    ("nginx", {"pli_ports": {"app": "eighty"}}, "argument 'app' is of type str"),
    (
        "monitoring",
        {"pli_ports": MONITORING_PORTS, "monitoring_alert_receivers": [{"webhook_configs": [{"url": "http://x"}]}]},
        "missing required arguments: name",
    ),
    (
        "monitoring",
        {"pli_ports": MONITORING_PORTS, "monitoring_alert_receivers": [{"name": "ops", "webhook": "http://x"}]},
        "monitoring_alert_receivers.webhook. Supported parameters include: email_configs, name",
    ),
    ("monitoring", {"pli_ports": MONITORING_PORTS, "monitoring_alert_cpu_percent": "lots"}, "is of type str"),
]


def ansible_environment() -> dict[str, str]:
    """ansible-playbook with this repository's roles and collections, without colours."""
    return {
        "ANSIBLE_COLLECTIONS_PATH": str(REPO / "collections"),
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
        "ANSIBLE_NOCOLOR": "1",
    }


def run_role(
    tmp_path: Path, role: str, variables: dict[str, object], *, check_mode: bool = False
) -> subprocess.CompletedProcess[str]:
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "argument check",
                    "hosts": "localhost",
                    "connection": "local",
                    # A role's own checks after the argument check: in check mode, so that a check that
                    # wrongly passed could not change this machine either.
                    "check_mode": check_mode,
                    # Role defaults use facts (distribution, kernel) as in real plays.
                    "gather_facts": True,
                    "gather_subset": ["!all", "min"],
                    "tasks": [{"ansible.builtin.include_role": {"name": role}, "vars": variables}],
                }
            ]
        )
    )
    env = ansible_environment()
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-playbook")),
            "-i",
            "localhost,",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(playbook),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )


def test_every_role_declares_its_arguments():
    assert {"base", "docker", "nvidia_driver", "nvidia_container_toolkit", "nginx", "certbot"} <= set(ROLES)


@pytest.mark.parametrize(
    ("role", "variables", "message"),
    BAD_INPUT,
    ids=lambda v: v if isinstance(v, str) and "_" in v and " " not in v else None,
)
def test_wrong_input_fails_with_a_clear_message(tmp_path, role, variables, message):
    result = run_role(tmp_path, role, variables)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Validating arguments against arg spec" in output, output
    assert "failed=1" in output, output
    assert message in output, output


CONVENTION = {"pli_address": "192.0.2.10", "pli_ports": {"app": 8000, "postgresql": 5432, "redis": 6379}}


@pytest.mark.parametrize(
    ("cidrs", "message"),
    [
        ([], "firewall_ssh_allowed_cidrs is empty"),
        (["10.0.0.0/8", "0.0.0.0/0"], "opens SSH to the whole internet (0.0.0.0/0)"),
        (["::/0"], "opens SSH to the whole internet (::/0)"),
    ],
    ids=["none", "ipv4-world", "ipv6-world"],
)
def test_the_firewall_refuses_ssh_for_nobody_or_for_everybody(tmp_path, cidrs, message):
    result = run_role(tmp_path, "firewall", {**CONVENTION, "firewall_ssh_allowed_cidrs": cidrs}, check_mode=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert message in output, output
    assert "Install nftables" not in output, output


def run_ops_playbook(
    tmp_path: Path, playbook: str, inventory: dict[str, object], *extra: str
) -> subprocess.CompletedProcess[str]:
    """One of playbooks/ against localhost (local connection, check mode: nothing could change here)."""
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(yaml.safe_dump(inventory))
    env = ansible_environment()
    command = [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(hosts), "--check"]
    command += [*extra, str(REPO / "playbooks" / playbook)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)


LOCAL = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}


def local_host(group: str, **variables: object) -> dict[str, object]:
    return {"all": {"children": {group: {"hosts": {"localhost": {**LOCAL, **variables}}}}}}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], """Name the volumes to rotate: -e '{"luks_rotate_volumes": ["data"]}'"""),
        (["-e", '{"luks_rotate_volumes": ["secrets"]}'], "No host of this play has the volume(s) secrets"),
    ],
    ids=["none-named", "not-on-any-host"],
)
def test_the_luks_rotation_refuses_a_request_it_would_do_nothing_for(tmp_path, extra, message):
    volumes = [{"name": "data", "device": "/srv/luks/data.img", "mount_point": "/srv/private-llm"}]
    result = run_ops_playbook(tmp_path, "rotate-luks-keys.yml", local_host("inference", luks_volumes=volumes), *extra)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert message in output, output
    assert "Rotate the keys" not in output, output


def test_the_luks_rotation_in_check_mode_says_what_it_would_do_on_the_hosts_with_the_volume(tmp_path):
    volumes = [{"name": "data", "device": "/srv/luks/data.img", "mount_point": "/srv/private-llm"}]
    inventory = local_host("inference", luks_volumes=volumes)
    # A second host without the volume: skipped, not failed.
    inventory["all"]["children"]["gateways"] = {"hosts": {"gateway": LOCAL}}  # type: ignore[index]
    result = run_ops_playbook(tmp_path, "rotate-luks-keys.yml", inventory, "-e", '{"luks_rotate_volumes": ["data"]}')
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Would rotate the key of data on localhost" in output, output
    assert re.search(r"gateway\s+: ok=\d+\s+changed=0 .* skipped=1", output), output


def test_the_tls_rotation_needs_an_address_to_check_before_it_changes_anything(tmp_path):
    result = run_ops_playbook(tmp_path, "rotate-tls.yml", local_host("gateways", nginx_server_name="api.pli.test"))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "certbot_rotate_check_address is empty: set pli_address" in output, output
    assert "Read the certificate nginx serves now" not in output, output


def test_the_archive_key_rotation_says_there_is_nothing_to_rotate_before_it_changes_anything(tmp_path):
    node = local_host("inference", pli_address="127.0.0.1", pli_ports={"app": 8000})
    result = run_ops_playbook(tmp_path, "rotate-archive-keys.yml", node)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Nothing to rotate on localhost: the archive is off" in output, output
    assert "Ask the app which master key" not in output, output


API_KEYS = [{"name": "team-a", "key": "sk-pli-teama_0123456789abcdefghijklmnopqrstuvwxyz"}]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "Name the tenant: -e tenant=NAME [-e overlap=24h]."),
        (["-e", "tenant=team-b"], "No key of tenant team-b in inference_app_api_keys (tenants: team-a)"),
        (["-e", "tenant=team-a", "-e", "overlap=1w"], "overlap must be a number and s, m, h or d (24h), not 1w."),
    ],
    ids=["no-tenant", "unknown-tenant", "bad-overlap"],
)
def test_the_api_key_rotation_refuses_a_wrong_request_before_it_changes_anything(tmp_path, extra, message):
    node = local_host("inference", pli_address="127.0.0.1", pli_ports={"app": 8000}, inference_app_api_keys=API_KEYS)
    result = run_ops_playbook(tmp_path, "rotate-api-keys.yml", node, *extra)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert message in output, output
    assert "Make the new key" not in output, output


def test_the_signing_key_rotation_says_there_is_nothing_to_rotate_before_it_changes_anything(tmp_path):
    node = local_host("inference", pli_address="127.0.0.1", pli_ports={"app": 8000}, inference_app_api_keys=API_KEYS)
    result = run_ops_playbook(tmp_path, "rotate-jwt-keys.yml", node)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Nothing to rotate on localhost: inference_app_jwt_keys is empty" in output, output
    assert "Read the signing keys" not in output, output


def test_a_rollback_with_no_earlier_release_says_so_before_it_changes_anything(tmp_path):
    node = local_host("inference", pli_address="127.0.0.1", pli_ports={"app": 8000}, inference_app_root=str(tmp_path))
    result = run_ops_playbook(tmp_path, "upgrade.yml", node, "-e", "rollback=true")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"No earlier release on localhost to go back to ({tmp_path}/previous is missing" in output, output
    assert "Switch back to it" not in output, output


STATE = {"pli_address": "127.0.0.1", "pli_ports": {"postgresql": 5432}}


@pytest.mark.parametrize(
    ("playbook", "variables", "message"),
    [
        ("backup.yml", {}, "backup_age_recipients is empty on localhost"),
        ("backup.yml", {"backup_age_recipients": ["age1-not-a-key"]}, "must list age public keys"),
        ("restore.yml", {}, "Name the backup and the age identity: -e backup=DIR -e identity=FILE."),
    ],
    ids=["no-recipient", "bad-recipient", "restore-unnamed"],
)
def test_backup_and_restore_refuse_what_they_cannot_do_before_they_change_anything(
    tmp_path, playbook, variables, message
):
    result = run_ops_playbook(tmp_path, playbook, local_host("state", **STATE, **variables))
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, output
    assert message in output, output
    assert "Install age" not in output, output
