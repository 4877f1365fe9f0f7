"""The monitoring role's configuration, rendered by Ansible from its templates for a small inventory and checked
by the servers' own tools: `promtool check rules`, `promtool test rules` (tests/monitoring/rules-test.yml: each
alert firing when it should and silent when it should not), `promtool check config`, `amtool check-config`.
promtool and amtool come from Debian's prometheus packages (`make test-servers`)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.roles.test_argument_specs import MONITORING_PORTS, ansible_environment

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles/monitoring"
RULES_TEST = Path(__file__).with_name("rules-test.yml")
PORTS = MONITORING_PORTS
VOLUME = [{"name": "data", "mount_point": "/srv/private-llm"}]
INVENTORY = {
    "all": {
        "children": {
            "gateways": {
                "hosts": {"pli-gw": {"pli_address": "10.0.0.10", "nginx_server_name": "gateway.example.test"}}
            },
            "state": {"hosts": {"pli-gw": {}}},
            "monitoring": {"hosts": {"pli-gw": {}}},
            "inference": {
                "hosts": {
                    "pli-node1": {"pli_address": "10.0.0.21", "luks_volumes": VOLUME},
                    "pli-node2": {"pli_address": "10.0.0.22", "luks_volumes": VOLUME},
                }
            },
        },
        "vars": {"pli_ports": PORTS},
    }
}
FILES = ("rules.yml", "prometheus.yml", "alertmanager.yml", "blackbox.yml")


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: `make test-servers` installs it from Debian's prometheus packages"
    return path


def render(directory: Path, inventory: dict[str, Any] = INVENTORY, **extra_vars: object) -> dict[str, Path]:
    """The role's templates as its tasks write them (its defaults and vars, the inventory, as pli-gw)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.yml").write_text(yaml.safe_dump(inventory))
    play = [
        {
            "name": "render",
            "hosts": "pli-gw",
            "connection": "local",
            "gather_facts": False,
            "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}"},
            "tasks": [
                {"ansible.builtin.include_vars": str(ROLE / "defaults/main.yml")},
                {"ansible.builtin.include_vars": str(ROLE / "vars/main.yml")},
                {
                    "ansible.builtin.template": {
                        "src": f"{ROLE}/templates/{{{{ item }}}}.j2",
                        "dest": f"{directory}/{{{{ item }}}}",
                        "mode": "0644",
                    },
                    "loop": list(FILES),
                },
            ],
        }
    ]
    (directory / "play.yml").write_text(yaml.safe_dump(play))
    result = subprocess.run(
        [
            *(str(REPO / ".venv/bin/ansible-playbook"), "-i", str(directory / "hosts.yml")),
            # As extra vars: above the role's defaults, which the play includes as variables.
            *("-e", json.dumps(extra_vars), str(directory / "play.yml")),
        ],
        capture_output=True,
        text=True,
        env=ansible_environment(),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return {name: directory / name for name in FILES}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return render(tmp_path_factory.mktemp("monitoring"))


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_the_rules_pass_promtool(rendered):
    checked = run(tool("promtool"), "check", "rules", str(rendered["rules.yml"]))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # 22 alerts, DataVolumeNotMounted once per node.
    assert "SUCCESS: 23 rules found" in checked.stdout


def test_every_alert_fires_when_it_should_and_stays_silent_when_it_should_not(rendered, tmp_path):
    cases = yaml.safe_load(RULES_TEST.read_text())
    cases["rule_files"] = [str(rendered["rules.yml"])]
    test_file = tmp_path / "rules-test.yml"
    test_file.write_text(yaml.safe_dump(cases, allow_unicode=True))
    tested = run(tool("promtool"), "test", "rules", str(test_file))
    assert tested.returncode == 0, tested.stdout + tested.stderr

    alerts = {
        rule["alert"]
        for group in yaml.safe_load(rendered["rules.yml"].read_text())["groups"]
        for rule in group["rules"]
    }
    checks = [check for case in cases["tests"] for check in case["alert_rule_test"]]
    fires = {check["alertname"] for check in checks if check["exp_alerts"]}
    silent = {check["alertname"] for check in checks if not check["exp_alerts"]}
    assert fires == alerts, f"no firing case for {sorted(alerts - fires)}"
    assert silent == alerts, f"no silent case for {sorted(alerts - silent)}"


def test_every_alert_has_a_duration_a_severity_a_summary_and_a_runbook_line_in_the_readme(rendered):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for group in yaml.safe_load(rendered["rules.yml"].read_text())["groups"]:
        for rule in group["rules"]:
            assert "for" in rule, rule["alert"]
            assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["runbook"] == "README.md#alerts"
            assert f"| `{rule['alert']}` |" in readme, f"{rule['alert']} has no line in the README's alert table"


def test_one_volume_alert_per_host_and_encrypted_volume(rendered):
    rules = [rule for group in yaml.safe_load(rendered["rules.yml"].read_text())["groups"] for rule in group["rules"]]
    volumes = [rule["labels"]["host"] for rule in rules if rule["alert"] == "DataVolumeNotMounted"]
    assert volumes == ["pli-node1", "pli-node2"]


def test_the_scrape_targets_come_from_the_inventory(rendered):
    checked = run(tool("promtool"), "check", "config", "--syntax-only", str(rendered["prometheus.yml"]))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    jobs = {job["job_name"]: job for job in yaml.safe_load(rendered["prometheus.yml"].read_text())["scrape_configs"]}

    def targets(job: str) -> dict[str, str]:
        return {
            target: config["labels"]["host"] for config in jobs[job]["static_configs"] for target in config["targets"]
        }

    assert targets("node") == {"10.0.0.10:9100": "pli-gw", "10.0.0.21:9100": "pli-node1", "10.0.0.22:9100": "pli-node2"}
    assert targets("app") == {"10.0.0.21:8000": "pli-node1", "10.0.0.22:8000": "pli-node2"}
    assert targets("nginx") == {"10.0.0.10:9113": "pli-gw"}
    assert targets("gateway_log") == {"10.0.0.10:3903": "pli-gw"}
    assert targets("postgresql") == {"10.0.0.10:9187": "pli-gw"}
    assert targets("redis") == {"10.0.0.10:9121": "pli-gw"}
    assert jobs["blackbox"]["static_configs"][0]["targets"] == ["https://gateway.example.test/health"]
    assert jobs["blackbox"]["relabel_configs"][-1]["replacement"] == "127.0.0.1:9115"


def blackbox_targets(files: dict[str, Path]) -> list[str]:
    jobs = {job["job_name"]: job for job in yaml.safe_load(files["prometheus.yml"].read_text())["scrape_configs"]}
    return [target for config in jobs["blackbox"]["static_configs"] for target in config["targets"]]


def test_a_gateway_without_a_public_name_is_probed_by_its_inventory_name_unless_urls_are_given(tmp_path):
    inventory = copy.deepcopy(INVENTORY)
    del inventory["all"]["children"]["gateways"]["hosts"]["pli-gw"]["nginx_server_name"]
    assert blackbox_targets(render(tmp_path / "default", inventory)) == ["https://pli-gw/health"]
    given = ["https://chat.example.test/health", "https://api.example.test/health"]
    assert blackbox_targets(render(tmp_path / "given", inventory, monitoring_probe_urls=given)) == given


def test_alertmanager_sends_every_alert_to_every_receiver(tmp_path):
    receivers = [
        {"name": "ops-webhook", "webhook_configs": [{"url": "https://hooks.example.test/alert"}]},
        {"name": "ops-mail", "email_configs": [{"to": "ops@example.test"}]},
    ]
    smtp = {"smarthost": "mail.example.test:587", "from": "prometheus@example.test"}
    files = render(tmp_path, monitoring_alert_receivers=receivers, monitoring_alertmanager_smtp=smtp)
    checked = run(tool("amtool"), "check-config", str(files["alertmanager.yml"]))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(files["alertmanager.yml"].read_text())
    assert [(route["receiver"], route["continue"]) for route in config["route"]["routes"]] == [
        ("ops-webhook", True),
        ("ops-mail", True),
    ]
    assert config["global"]["smtp_smarthost"] == "mail.example.test:587"


def test_with_no_receiver_alertmanager_still_starts_and_tells_nobody(rendered):
    checked = run(tool("amtool"), "check-config", str(rendered["alertmanager.yml"]))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(rendered["alertmanager.yml"].read_text())
    assert config["route"]["routes"] == [] and config["receivers"] == [{"name": "nobody"}]


def test_the_blackbox_module_verifies_tls(rendered):
    module = yaml.safe_load(rendered["blackbox.yml"].read_text())["modules"]["https_2xx"]
    assert module["http"]["fail_if_not_ssl"] is True
    assert module["http"]["tls_config"]["insecure_skip_verify"] is False
