"""The monitoring role's GPU collector (roles/monitoring/files/gpu-metrics.py): its parsers and the textfile it
writes, which `promtool check metrics` and prometheus-client's own parser must accept.

Skipped here, for want of a GPU on this machine: the live path (nvidia-smi and the driver's kernel log on a
GPU host). The inputs below follow `nvidia-smi --query-gpu=... --format=csv,noheader,nounits` and the
driver's "NVRM: Xid" kernel lines as NVIDIA documents them; they were not captured from a GPU in this
repository's sessions."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

SCRIPT = Path(__file__).resolve().parents[2] / "roles/monitoring/files/gpu-metrics.py"
_spec = importlib.util.spec_from_file_location("gpu_metrics", SCRIPT)
assert _spec and _spec.loader
gpu_metrics = importlib.util.module_from_spec(_spec)
sys.modules["gpu_metrics"] = gpu_metrics
_spec.loader.exec_module(gpu_metrics)

QUERY_OUTPUT = """\
0, 00000000:3B:00.0, NVIDIA H200, 87, 120034, 143771, 61, 512.43
1, 00000000:86:00.0, NVIDIA H200, 0, 1, 143771, 33, [N/A]
"""
KERNEL_LOG = """\
NVRM: loading NVIDIA UNIX x86_64 Kernel Module  550.54.15
NVRM: Xid (PCI:0000:86:00): 31, pid=2297, name=python3, Ch 00000008, intr 00000000. MMU Fault
NVRM: Xid (PCI:0000:86:00): 79, pid=2297, name=python3, GPU has fallen off the bus.
NVRM: Xid (PCI:0000:af:00): 13, pid=4000, name=other, Graphics Exception
"""


def samples(text: str) -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels.get("gpu", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_query_output_becomes_one_record_per_gpu():
    first, second = gpu_metrics.parse_gpus(QUERY_OUTPUT)
    assert (first.index, first.name, first.utilization_ratio, first.temperature_celsius) == (
        "0",
        "NVIDIA H200",
        0.87,
        61,
    )
    assert first.memory_used_bytes == 120034 * 1024 * 1024 and first.power_watts == 512.43
    # What the GPU does not report is no sample at all, not a 0.
    assert second.power_watts is None


def test_xid_lines_count_for_the_gpu_on_their_bus():
    gpus = gpu_metrics.parse_gpus(QUERY_OUTPUT)
    errors, last = gpu_metrics.count_xids(KERNEL_LOG, gpus)
    assert dict(errors) == {"1": 2}, "the Xid on a bus nvidia-smi does not list belongs to no GPU here"
    assert last == {"1": 79}


def test_a_changed_query_is_refused_not_misread():
    with pytest.raises(ValueError, match="8 were asked for"):
        gpu_metrics.parse_gpus("0, 00000000:3B:00.0, NVIDIA H200, 87\n")


def test_the_textfile_is_valid_exposition_with_every_gpu():
    gpus = gpu_metrics.parse_gpus(QUERY_OUTPUT)
    text = gpu_metrics.render(gpus, gpu_metrics.count_xids(KERNEL_LOG, gpus))
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test-servers` installs it from Debian's prometheus package"
    linted = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert linted.returncode == 0, linted.stdout + linted.stderr

    values = samples(text)
    assert values[("private_llm_gpu_utilization_ratio", "0")] == 0.87
    assert values[("private_llm_gpu_temperature_celsius", "1")] == 33
    assert ("private_llm_gpu_power_watts", "1") not in values
    assert values[("private_llm_gpu_xid_errors_total", "0")] == 0
    assert values[("private_llm_gpu_xid_errors_total", "1")] == 2
    assert values[("private_llm_gpu_last_xid", "1")] == 79


def test_without_the_kernel_log_no_xid_count_is_made_up():
    text = gpu_metrics.render(gpu_metrics.parse_gpus(QUERY_OUTPUT), None)
    assert "xid" not in text
    assert samples(text)[("private_llm_gpu_memory_total_bytes", "0")] == 143771 * 1024 * 1024


def test_the_file_is_replaced_whole(tmp_path):
    target = tmp_path / "gpu.prom"
    target.write_text("old\n")
    gpu_metrics.write_atomically(target, "new\n")
    assert target.read_text() == "new\n"
    assert [path.name for path in tmp_path.iterdir()] == ["gpu.prom"]
    assert target.stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is None,
    reason="the live path needs a GPU: nvidia-smi and the NVIDIA driver (none on this machine)",
)
def test_on_a_gpu_host_every_gpu_is_in_the_textfile(tmp_path):
    out = tmp_path / "gpu.prom"
    assert gpu_metrics.main(["gpu-metrics.py", str(out)]) == 0
    listed = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, check=True, timeout=30)
    reported = {gpu for (name, gpu) in samples(out.read_text()) if name == "private_llm_gpu_info"}
    assert len(reported) == len(listed.stdout.splitlines())
