"""The monitoring role on the stack: Prometheus on the gateway (the monitoring host) scrapes every host the
inventory names through the firewall, the app's series carry vLLM's names, the probe verifies the served
certificate, and stopping the app on one node delivers InferenceNodeDown to the webhook receiver (prepare.yml's
recorder), resolved once the node is back."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from stack import NODES, ask, machine, wait_for

RECORD = "/var/lib/alert-recorder/alerts.jsonl"
GATEWAY = "pli-stack-gw"
DASHBOARD = Path(__file__).resolve().parents[3] / "dashboards/private-llm.json"
# Dashboard panels with no data in this stack, and why; the series each reads must still be declared by the
# nodes' /metrics (so the panel's name is right, and fills once it happens).
DECLARED_ONLY = {
    "Quota rejections per second": "private_llm_quota_rejections_total",  # none refused before test_shared_state
    "Content filter blocks per second": "private_llm_content_filter_blocks_total",  # this stack runs no filter
}
PROBE_FROM = "python3 -c \"import socket; socket.create_connection(('{ip}', {port}), timeout=3)\""


def prometheus(path: str, **params: str) -> Any:
    arguments = " ".join(f"--data-urlencode {shlex.quote(f'{name}={value}')}" for name, value in params.items())
    output = machine(GATEWAY).check_output(f"curl -sfG {arguments} http://127.0.0.1:9090/api/v1/{path}")
    answer = json.loads(output)
    assert answer["status"] == "success", answer
    return answer["data"]


def query(expression: str) -> list[dict[str, Any]]:
    return prometheus("query", query=expression)["result"]


def delivered(alertname: str, status: str, host: str, since_line: int) -> list[dict[str, Any]]:
    record = machine(GATEWAY).file(RECORD)
    lines = record.content_string.splitlines()[since_line:] if record.exists else []
    return [
        {**alert, "notified_line": since_line + number}
        for number, line in enumerate(lines)
        for alert in json.loads(line)["alerts"]
        if alert["labels"]["alertname"] == alertname
        and alert["status"] == status
        and alert["labels"].get("host") == host
    ]


def last_notified(alertname: str, host: str) -> str | None:
    """The status of the last notification about that alert and host: firing, resolved, or None."""
    alerts = delivered(alertname, "firing", host, 0) + delivered(alertname, "resolved", host, 0)
    return max(alerts, key=lambda alert: alert["notified_line"])["status"] if alerts else None


def recorded_lines() -> int:
    record = machine(GATEWAY).file(RECORD)
    return len(record.content_string.splitlines()) if record.exists else 0


def test_every_host_of_the_inventory_is_scraped_through_the_firewall():
    expected = {
        "node": {GATEWAY, *NODES},
        "app": set(NODES),
        "nginx": {GATEWAY},
        "gateway_log": {GATEWAY},
        "postgresql": {GATEWAY},
        "redis": {GATEWAY},
        "blackbox": {"https://gateway.pli.test/health"},
        "prometheus": {GATEWAY},
    }

    def scraped() -> dict[str, set[str]] | None:
        targets = prometheus("targets")["activeTargets"]
        jobs: dict[str, set[str]] = {}
        for target in targets:
            label = "instance" if target["labels"]["job"] == "blackbox" else "host"
            jobs.setdefault(target["labels"]["job"], set()).add(target["labels"][label])
        healthy = all(target["health"] == "up" for target in targets)
        return jobs if healthy and jobs == expected else None

    wait_for(scraped, f"every target up: {expected}", timeout_s=120)


def test_only_the_monitoring_host_reaches_the_exporters():
    outsider = machine("pli-stack-acme")
    for ip in NODES.values():
        assert machine(GATEWAY).run(PROBE_FROM.format(ip=ip, port=9100)).rc == 0
        assert outsider.run(PROBE_FROM.format(ip=ip, port=9100)).rc != 0
    # nginx's exporter, mtail, PostgreSQL's and Redis's exporters, the node exporter on the gateway.
    for port in (9113, 3903, 9187, 9121, 9100):
        assert outsider.run(PROBE_FROM.format(ip="172.29.88.10", port=port)).rc != 0, port


def test_both_nodes_report_the_engine_under_vllms_names(client):
    client.models.list()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:e2e_request_latency_seconds_count"):
        series = wait_for(lambda name=name: query(name), f"{name} from both nodes", timeout_s=60)
        assert {entry["metric"]["host"] for entry in series} == set(NODES), series
        assert all(entry["metric"].get("model_name") for entry in series), series
    ready = query('private_llm_state{state="ready"} == 1')
    assert {entry["metric"]["host"] for entry in ready} == set(NODES)


def test_every_dashboard_panel_reads_data_from_the_stacks_prometheus(client):
    """Grafana is not in Debian: the dashboard is proven by its queries, each asked of the live Prometheus.
    GPU panels have no data without a GPU (the collector is installed only where nvidia-smi is)."""
    ask(client, "Say hi.", max_tokens=4)
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    expected_empty = set(DECLARED_ONLY) | {panel["title"] for panel in panels if panel["title"].startswith("GPU")}

    def empty_panels() -> set[str] | None:
        empty = {
            panel["title"]
            for panel in panels
            if any(not query(target["expr"].replace("$__rate_interval", "1m")) for target in panel["targets"])
        }
        return empty if empty == expected_empty else None

    wait_for(empty_panels, f"data for every panel but {sorted(expected_empty)}", timeout_s=60)
    exposition = machine(GATEWAY).check_output(f"curl -s http://{NODES['pli-stack-node1']}:8000/metrics")
    for series in DECLARED_ONLY.values():
        assert f"# TYPE {series} counter" in exposition, series


def test_the_probe_verifies_the_served_certificate_and_reads_its_expiry():
    wait_for(lambda: query('probe_success{job="blackbox"} == 1'), "the gateway's probe succeeding", timeout_s=60)
    days_left = float(query('(probe_ssl_earliest_cert_expiry{job="blackbox"} - time()) / 86400')[0]["value"][1])
    assert days_left > 14
    assert not query('ALERTS{alertname="TlsCertificateExpiringSoon"}')


def test_a_stopped_app_delivers_inference_node_down_and_its_return_resolves_it():
    node = "pli-stack-node2"
    # Other tests restart the apps: a notification still pending from one would make Alertmanager see no
    # change when this stop fires the alert again.
    wait_for(lambda: last_notified("InferenceNodeDown", node) in {None, "resolved"}, "no earlier alert pending", 120)
    start = recorded_lines()
    machine(node).check_output("systemctl stop private-llm-app")
    try:
        fired = wait_for(
            lambda: delivered("InferenceNodeDown", "firing", node, start), "InferenceNodeDown at the webhook", 120
        )
        assert fired[0]["labels"]["severity"] == "page"
        assert fired[0]["annotations"]["runbook"] == "README.md#alerts"
    finally:
        machine(node).check_output("systemctl start private-llm-app")
    wait_for(lambda: machine(node).run(f"curl -sf http://{NODES[node]}:8000/ready").rc == 0, f"{node} ready again", 240)
    wait_for(lambda: delivered("InferenceNodeDown", "resolved", node, start), "InferenceNodeDown resolved", 120)


def test_the_shared_state_and_the_gateways_answers_are_measured(client):
    """PostgreSQL's exporter reads the app's database as pg_monitor; Redis's reads its server as a user that
    may touch no key; mtail counts the gateway's answers by status from nginx's access log."""
    ask(client, "Say hi.", max_tokens=2)
    wait_for(lambda: query('pg_up{job="postgresql"} == 1'), "PostgreSQL's exporter connected", timeout_s=60)
    backends = wait_for(
        lambda: query('pg_stat_database_numbackends{job="postgresql", datname="private_llm"} > 0'),
        "the nodes' connections to the app's database",
        timeout_s=60,
    )
    assert backends[0]["metric"]["host"] == GATEWAY
    assert query('pg_settings_max_connections{job="postgresql"} > 0')
    wait_for(lambda: query('redis_up{job="redis"} == 1'), "Redis's exporter connected", timeout_s=60)
    assert query('redis_memory_max_bytes{job="redis"} > 0'), "maxmemory from INFO (no CONFIG GET for this user)"
    answered = wait_for(
        lambda: query('private_llm_gateway_responses_total{job="gateway_log", status="200"} > 0'),
        "the gateway's 200s counted from its access log",
        timeout_s=60,
    )
    assert answered[0]["metric"]["host"] == GATEWAY
    # Rules evaluate every 2 s here: an alert from an earlier test's restart may still be resolving.
    wait_for(
        lambda: not query('ALERTS{alertname=~"PostgresqlDown|RedisDown|GatewayExporterDown"}'),
        "no state or gateway exporter alert",
        timeout_s=30,
    )
