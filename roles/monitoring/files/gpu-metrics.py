#!/usr/bin/python3
"""The GPUs' numbers for the node exporter's textfile collector: utilisation, memory, temperature and power
from `nvidia-smi --query-gpu`, and the driver's Xid errors since boot from the kernel log (NVRM lines name
the GPU by its PCI bus id). Written to a temporary file and renamed, so the exporter never reads half a file.

Usage: gpu-metrics.py OUTPUT_FILE (run by private-llm-gpu-metrics.timer). Standard library only: it runs
with the host's Python, beside no virtual environment."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

QUERY = (
    "index",
    "pci.bus_id",
    "name",
    "utilization.gpu",
    "memory.used",
    "memory.total",
    "temperature.gpu",
    "power.draw",
)
# "NVRM: Xid (PCI:0000:3b:00): 79, pid=..., GPU has fallen off the bus."
XID_LINE = re.compile(r"NVRM: Xid \(PCI:(?P<bus>[0-9a-fA-F:.]+)\): (?P<xid>\d+)")


@dataclass(frozen=True)
class Gpu:
    index: str
    bus_id: str
    name: str
    utilization_ratio: float | None
    memory_used_bytes: float | None
    memory_total_bytes: float | None
    temperature_celsius: float | None
    power_watts: float | None


def _number(text: str, scale: float = 1.0) -> float | None:
    """nvidia-smi writes "[N/A]" or "[Not Supported]" for what a GPU does not report: no sample, not 0."""
    try:
        return float(text) * scale
    except ValueError:
        return None


def short_bus_id(bus_id: str) -> str:
    """nvidia-smi's 00000000:3B:00.0 and the kernel's 0000:3b:00 name the same device."""
    domain, bus, rest = bus_id.lower().split(":", 2)
    return f"{int(domain, 16):04x}:{bus}:{rest.split('.')[0]}"


def parse_gpus(output: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=<QUERY> --format=csv,noheader,nounits` (MiB for memory, W for power)."""
    gpus = []
    for row in csv.reader(output.splitlines(), skipinitialspace=True):
        if not row:
            continue
        if len(row) != len(QUERY):
            raise ValueError(f"nvidia-smi wrote {len(row)} fields where {len(QUERY)} were asked for: {row}")
        index, bus_id, name, utilization, used, total, temperature, power = (field.strip() for field in row)
        mib = 1024.0 * 1024.0
        gpus.append(
            Gpu(
                index=index,
                bus_id=bus_id,
                name=name,
                utilization_ratio=_number(utilization, 0.01),
                memory_used_bytes=_number(used, mib),
                memory_total_bytes=_number(total, mib),
                temperature_celsius=_number(temperature),
                power_watts=_number(power),
            )
        )
    return gpus


def count_xids(kernel_log: str, gpus: list[Gpu]) -> tuple[Counter[str], dict[str, int]]:
    """Xid errors per GPU index, and the last Xid each reported, from kernel messages."""
    by_bus = {short_bus_id(gpu.bus_id): gpu.index for gpu in gpus}
    errors: Counter[str] = Counter()
    last: dict[str, int] = {}
    for match in XID_LINE.finditer(kernel_log):
        index = by_bus.get(match["bus"].lower())
        if index is not None:
            errors[index] += 1
            last[index] = int(match["xid"])
    return errors, last


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(gpus: list[Gpu], xids: tuple[Counter[str], dict[str, int]] | None) -> str:
    """The textfile; without the kernel log (xids None) no Xid series, rather than a count of 0 that is not known."""
    gauges = (
        ("utilization_ratio", "GPU utilisation, 0 to 1.", lambda g: g.utilization_ratio),
        ("memory_used_bytes", "GPU memory in use.", lambda g: g.memory_used_bytes),
        ("memory_total_bytes", "GPU memory in all.", lambda g: g.memory_total_bytes),
        ("temperature_celsius", "GPU core temperature.", lambda g: g.temperature_celsius),
        ("power_watts", "GPU power draw.", lambda g: g.power_watts),
    )
    lines = [
        "# HELP private_llm_gpu_info The GPUs nvidia-smi sees.",
        "# TYPE private_llm_gpu_info gauge",
        *(f'private_llm_gpu_info{{gpu="{g.index}",name="{_escape(g.name)}",bus_id="{g.bus_id}"}} 1' for g in gpus),
    ]
    for metric, help_text, value_of in gauges:
        lines += [f"# HELP private_llm_gpu_{metric} {help_text}", f"# TYPE private_llm_gpu_{metric} gauge"]
        lines += [
            f'private_llm_gpu_{metric}{{gpu="{g.index}"}} {value}' for g in gpus if (value := value_of(g)) is not None
        ]
    if xids is None:
        return "\n".join(lines) + "\n"
    errors, last = xids
    lines += [
        "# HELP private_llm_gpu_xid_errors_total Xid errors the driver logged for this GPU since boot.",
        "# TYPE private_llm_gpu_xid_errors_total counter",
        *(f'private_llm_gpu_xid_errors_total{{gpu="{g.index}"}} {errors[g.index]}' for g in gpus),
        "# HELP private_llm_gpu_last_xid The last Xid the driver logged for this GPU since boot.",
        "# TYPE private_llm_gpu_last_xid gauge",
        *(f'private_llm_gpu_last_xid{{gpu="{g.index}"}} {last[g.index]}' for g in gpus if g.index in last),
    ]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".gpu-metrics.", delete=False) as file:
        file.write(text)
    temporary = Path(file.name)
    try:
        temporary.chmod(0o644)
        temporary.replace(path)
    except BaseException:
        temporary.unlink()
        raise


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    query = ["nvidia-smi", f"--query-gpu={','.join(QUERY)}", "--format=csv,noheader,nounits"]
    gpus = parse_gpus(subprocess.run(query, check=True, capture_output=True, text=True, timeout=30).stdout)
    kernel = subprocess.run(
        ["journalctl", "--dmesg", "--boot", "--no-pager", "--output=cat", "--grep=NVRM: Xid"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # journalctl exits 1 when no line matches: no Xid since boot.
    xids = count_xids(kernel.stdout, gpus) if kernel.returncode in (0, 1) else None
    if xids is None:
        print(f"gpu-metrics: the kernel log could not be read, no Xid counts: {kernel.stderr.strip()}", file=sys.stderr)
    write_atomically(Path(argv[1]), render(gpus, xids))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
