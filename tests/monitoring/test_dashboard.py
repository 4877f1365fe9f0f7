"""The Grafana dashboard (dashboards/private-llm.json) for sites that run Grafana, which is not in Debian and so
not in this repository's tests: each panel's queries are valid PromQL (`promtool check rules` on them as
recording rules) and read only series that the project exposes: the app's registry, the GPU collector's
textfile, and the Debian exporters' series named here (those are proven live by the full-stack scenario,
where every panel's query returns data from the stack's Prometheus)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards/private-llm.json"
# What Grafana puts in place of $__rate_interval (four scrape intervals at 15 s).
RATE_INTERVAL = "1m"
SERIES = re.compile(r"\b(?:vllm:[a-z0-9_]+|private_llm_[a-z0-9_]+|node_[A-Za-z0-9_]+|nginx_[a-z0-9_]+)\b")
EXPORTER_SERIES = {
    "node_cpu_seconds_total",
    "node_memory_MemAvailable_bytes",
    "node_memory_MemTotal_bytes",
    "nginx_connections_active",
    "nginx_http_requests_total",
}


def panels() -> list[dict[str, Any]]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]


def expressions() -> list[str]:
    return [
        target["expr"].replace("$__rate_interval", RATE_INTERVAL) for panel in panels() for target in panel["targets"]
    ]


def app_series() -> set[str]:
    names: set[str] = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
    return names


def gpu_series() -> set[str]:
    script = REPO / "roles/monitoring/files/gpu-metrics.py"
    spec = importlib.util.spec_from_file_location("gpu_metrics_for_dashboard", script)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    gpus = module.parse_gpus("0, 00000000:3B:00.0, NVIDIA H200, 87, 120034, 143771, 61, 512.43\n")
    text = module.render(gpus, module.count_xids("", gpus))
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_panel_has_a_title_queries_and_the_prometheus_variable():
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["title"] and panel["targets"], panel
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(target["expr"] and target["datasource"]["uid"] == "${datasource}" for target in panel["targets"])
    titles = " ".join(panel["title"] for panel in panels())
    for what in ("first token", "Inter-token", "End-to-end", "Tokens per second", "running and waiting", "5xx"):
        assert what in titles
    for what in ("Quota", "filter", "GPU"):
        assert what in titles


def test_every_query_is_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test-servers` installs it from Debian's prometheus package"
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"panel_query_{n}", "expr": expr} for n, expr in enumerate(expressions())],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_series_a_query_reads_is_one_the_project_exposes():
    exposed = app_series() | gpu_series() | EXPORTER_SERIES
    read = {name for expr in expressions() for name in SERIES.findall(expr)}
    assert read - exposed == set()
    # Every engine series the issue names is on the dashboard.
    for name in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:generation_tokens_total",
        "private_llm_quota_rejections_total",
        "private_llm_content_filter_blocks_total",
        "private_llm_gpu_utilization_ratio",
    ):
        assert name in read, name
