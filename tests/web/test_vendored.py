"""The chat page's libraries in the package are the versions web/package-lock.json pins (make web-vendor)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENDOR = REPO / "app" / "web" / "static" / "vendor"
# Each file's licence banner names its version.
BANNERS = {"marked": ("marked.umd.js", r"marked v(\S+) - "), "dompurify": ("purify.min.js", r"DOMPurify (\S+) \|")}


@pytest.mark.parametrize("package", sorted(BANNERS))
def test_the_vendored_copy_is_the_locked_version(package: str) -> None:
    lock = json.loads((REPO / "web" / "package-lock.json").read_text(encoding="utf-8"))
    locked = lock["packages"][f"node_modules/{package}"]["version"]
    file, banner = BANNERS[package]
    head = (VENDOR / file).read_text(encoding="utf-8")[:400]
    found = re.search(banner, head)
    assert found is not None, f"{file} has no version banner"
    assert found.group(1) == locked, f"{file} is {package} {found.group(1)}, the lock pins {locked}: make web-vendor"
