"""What the tenancy tests share: a clock they set, and the app's command line run as an operator would."""

from __future__ import annotations

import subprocess
import sys


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def app_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args], input=stdin, capture_output=True, text=True, check=False, timeout=60
    )
