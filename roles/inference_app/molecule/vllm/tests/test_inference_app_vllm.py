"""Verify the app role with engine vllm: vLLM serves under the hardened unit and keeps its usage statistics
to itself. The API, key and lock checks (the release's environment is exactly the vLLM lock) are in
../../shared/test_app_api.py, which runs first and waits for readiness."""

from __future__ import annotations

import json


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
    assert host.check_output("find /var/lib/private-llm /var/cache/pli-compile -name 'usage_stats*'") == ""


def test_what_vllm_compiled_is_kept_in_the_compile_cache(host):
    # Not under /tmp, which the unit's PrivateTmp empties at every start: a restart would compile again.
    engine_core = host.check_output("pgrep -u llm -f EngineCore | head -1")
    environment = host.check_output(f"tr '\\0' '\\n' < /proc/{engine_core}/environ").splitlines()
    assert "TORCHINDUCTOR_CACHE_DIR=/var/cache/pli-compile/torchinductor" in environment
    assert "/var/cache/pli-compile" in host.check_output("systemctl show -p ReadWritePaths --value private-llm-app")
    kernels = host.check_output("find /var/cache/pli-compile/torchinductor -name '*.so' | wc -l")
    assert int(kernels) > 0, "no compiled kernel in the compile cache"
