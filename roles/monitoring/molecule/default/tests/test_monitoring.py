"""Verify the monitoring host as an operator relies on it: the servers on loopback only, every target the
inventory names scraped, the rules loaded, the probe reading the served certificate over verified TLS, and
alerts really delivered to the webhook receiver: the 7-day certificate's, and a stopped node exporter's,
firing and then resolved once it runs again."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
import yaml

PROMETHEUS = "http://127.0.0.1:9090"
RECORD = "/var/lib/alert-recorder/alerts.jsonl"
RULES = "/etc/prometheus/rules/private-llm.rules.yml"
# Generous bounds: scrape and evaluation run every 2 s and `for:` is 4 s in this scenario, so each wait
# below normally ends within 10-20 s; the bound only stops a broken setup from hanging the run.
DEADLINE_SECONDS = 120
# prepare.yml's plain HTTP server, whose /broken answers 502.
PLAIN_PORT = 8080


def fetch_json(host, url: str) -> Any:
    script = f"import sys, urllib.request as r; sys.stdout.write(r.urlopen({url!r}, timeout=10).read().decode())"
    return json.loads(host.check_output("python3 -c %s", script))


def query(host, expression: str) -> list[dict[str, Any]]:
    answer = fetch_json(host, f"{PROMETHEUS}/api/v1/query?query={quote(expression)}")
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(what: str, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not within {DEADLINE_SECONDS} s: {what}")
        time.sleep(1)


def delivered(host, alertname: str, status: str, since_line: int = 0) -> list[dict[str, Any]]:
    """The alerts of that name and status among the notifications recorded after line `since_line`."""
    if not host.file(RECORD).exists:
        return []
    lines = host.file(RECORD).content_string.splitlines()[since_line:]
    return [
        alert
        for line in lines
        for alert in json.loads(line)["alerts"]
        if alert["labels"]["alertname"] == alertname and alert["status"] == status
    ]


def recorded_lines(host) -> int:
    return len(host.file(RECORD).content_string.splitlines()) if host.file(RECORD).exists else 0


@pytest.fixture(scope="module")
def address(host) -> str:
    facts = host.ansible("setup", "filter=ansible_default_ipv4")["ansible_facts"]
    return facts["ansible_default_ipv4"]["address"]


def test_servers_listen_on_loopback_and_exporters_on_the_private_address_only(host, address):
    listening = {line.split()[3] for line in host.check_output("ss -Hltn").splitlines()}
    for port in (9090, 9093, 9115):
        assert f"127.0.0.1:{port}" in listening
        assert not {f"0.0.0.0:{port}", f"*:{port}", f"[::]:{port}"} & listening
    for port in (9100, 9113, 3903):
        assert f"{address}:{port}" in listening
        assert not {f"0.0.0.0:{port}", f"*:{port}", f"[::]:{port}"} & listening
    # Alertmanager's cluster port stays closed: one Alertmanager, nothing to gossip with.
    assert not any(socket.endswith(":9094") for socket in listening)


def test_every_target_from_the_inventory_is_scraped_and_up(host, address):
    def targets() -> dict[str, list[dict[str, Any]]] | None:
        active = fetch_json(host, f"{PROMETHEUS}/api/v1/targets")["data"]["activeTargets"]
        jobs: dict[str, list[dict[str, Any]]] = {}
        for target in active:
            jobs.setdefault(target["labels"]["job"], []).append(target)
        ready = {"prometheus", "node", "nginx", "gateway_log", "blackbox"} <= set(jobs)
        return jobs if ready and all(t["health"] == "up" for t in active) else None

    jobs = wait_for("every target up", targets)
    assert [t["scrapeUrl"] for t in jobs["node"]] == [f"http://{address}:9100/metrics"]
    assert [t["scrapeUrl"] for t in jobs["nginx"]] == [f"http://{address}:9113/metrics"]
    assert [t["scrapeUrl"] for t in jobs["gateway_log"]] == [f"http://{address}:3903/metrics"]
    # No inference or state host in this inventory: their jobs are there, with no target.
    assert not {"app", "postgresql", "redis"} & set(jobs)
    assert {t["labels"]["host"] for t in jobs["node"]} == {host.backend.get_hostname()}


def test_nginx_counters_come_from_its_stub_status(host):
    up = wait_for("nginx_up", lambda: query(host, 'nginx_up{job="nginx"} == 1'))
    assert len(up) == 1
    assert query(host, 'nginx_connections_accepted{job="nginx"} > 0')


def test_the_gateways_answers_are_counted_by_status_and_a_5xx_share_is_reported(host):
    """mtail reads nginx's JSON access log: the answers by status, and GatewayErrorRateHigh once more than
    monitoring_alert_error_ratio of them are 5xx (prepare.yml's /broken answers 502). A status's series starts
    with its first answer, and rate() counts from a series' first sample: the first 502 makes the series, the
    next 200 are the increase (the probe's 200s on /health, one every 2 s, are answers too)."""
    start = recorded_lines(host)
    broken = f"http://127.0.0.1:{PLAIN_PORT}/broken"

    def ask_broken(times: int) -> None:
        script = "\n".join(
            [
                "import urllib.request as r",
                f"for _ in range({times}):",
                f"    try: r.urlopen({broken!r})",
                "    except OSError: pass",
            ]
        )
        host.check_output("python3 -c %s", script)

    ask_broken(1)
    wait_for(
        "the 502 series", lambda: query(host, 'private_llm_gateway_responses_total{job="gateway_log", status="502"}')
    )
    ask_broken(200)
    counted = wait_for(
        "502s counted",
        lambda: query(host, 'private_llm_gateway_responses_total{job="gateway_log", status="502"} >= 201'),
    )
    assert counted[0]["metric"]["host"] == host.backend.get_hostname()
    fired = wait_for(
        "GatewayErrorRateHigh at the webhook", lambda: delivered(host, "GatewayErrorRateHigh", "firing", start)
    )
    assert fired[0]["labels"]["severity"] == "page"
    assert "of the gateway's answers are 5xx" in fired[0]["annotations"]["summary"]


def test_the_probe_verifies_tls_and_reads_the_certificates_expiry(host):
    name = host.backend.get_hostname()
    wait_for("a successful probe", lambda: query(host, 'probe_success{job="blackbox"} == 1'))
    expiry = query(host, 'probe_ssl_earliest_cert_expiry{job="blackbox"} - time()')
    assert [series["metric"]["instance"] for series in expiry] == [f"https://{name}/health"]
    days_left = float(expiry[0]["value"][1]) / 86400
    assert 6 < days_left <= 7


def test_every_rule_is_loaded_and_evaluates(host):
    written = yaml.safe_load(host.file(RULES).content_string)["groups"]
    groups = fetch_json(host, f"{PROMETHEUS}/api/v1/rules")["data"]["groups"]
    # The API lists the groups in its own order.
    assert sorted(rule["name"] for group in groups for rule in group["rules"]) == sorted(
        rule["alert"] for group in written for rule in group["rules"]
    )
    # 22 alerts; DataVolumeNotMounted is one rule per encrypted volume, and this host has none.
    assert {"HostDown", "InferenceNodeDown", "NoInferenceNodeReady", "TlsCertificateExpiringSoon"} <= {
        rule["alert"] for group in written for rule in group["rules"]
    }
    assert sum(len(group["rules"]) for group in written) == 21
    wait_for(
        "every rule evaluated without error",
        lambda: all(
            rule["health"] == "ok"
            for group in fetch_json(host, f"{PROMETHEUS}/api/v1/rules")["data"]["groups"]
            for rule in group["rules"]
        ),
    )


def test_the_expiring_certificate_is_reported_to_the_receiver(host):
    alerts = wait_for(
        "TlsCertificateExpiringSoon at the webhook", lambda: delivered(host, "TlsCertificateExpiringSoon", "firing")
    )
    assert alerts[0]["labels"]["severity"] == "ticket"
    assert "the certificate expires in 7 days" in alerts[0]["annotations"]["summary"]
    assert alerts[0]["annotations"]["runbook"] == "README.md#alerts"


def test_a_stopped_node_exporter_fires_host_down_and_its_return_resolves_it(host):
    name = host.backend.get_hostname()
    start = recorded_lines(host)
    host.check_output("systemctl stop prometheus-node-exporter")
    try:
        fired = wait_for("HostDown firing at the webhook", lambda: delivered(host, "HostDown", "firing", start))
        assert fired[0]["labels"]["host"] == name
        assert fired[0]["labels"]["severity"] == "page"
    finally:
        host.check_output("systemctl start prometheus-node-exporter")
    resolved = wait_for("HostDown resolved at the webhook", lambda: delivered(host, "HostDown", "resolved", start))
    assert resolved[0]["labels"]["host"] == name
    assert host.service("prometheus-node-exporter").is_running
