#!/usr/bin/python3
"""Check a daemon.json before it replaces the live one (engines older than `dockerd --validate`).

Installed by private-llm-infra's docker role. Checks the file is a JSON object and that the keys the
project manages have the types dockerd expects; dockerd refuses to start on a wrong type, and a
refused daemon.json takes every container on the host down with it.
"""

import ipaddress
import json
import sys


def check(config: object) -> list[str]:
    if not isinstance(config, dict):
        return ["the top level must be a JSON object"]
    errors: list[str] = []

    def expect(key: str, kind: type, what: str) -> bool:
        if key in config and not isinstance(config[key], kind):
            errors.append(f"{key} must be {what}")
            return False
        return key in config

    expect("log-driver", str, "a string")
    expect("default-runtime", str, "a string")
    expect("live-restore", bool, "true or false")
    if expect("log-opts", dict, "an object") and not all(
        isinstance(v, str) for v in config["log-opts"].values()
    ):
        errors.append("log-opts values must be strings (dockerd rejects numbers there)")
    if expect("registry-mirrors", list, "a list") and not all(
        isinstance(m, str) and m.startswith(("http://", "https://")) for m in config["registry-mirrors"]
    ):
        errors.append("registry-mirrors entries must be http:// or https:// URLs")
    if expect("data-root", str, "a string") and not config["data-root"].startswith("/"):
        errors.append("data-root must be an absolute path")
    if expect("default-address-pools", list, "a list"):
        for pool in config["default-address-pools"]:
            try:
                ipaddress.ip_network(pool["base"])
                if not isinstance(pool["size"], int):
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                errors.append(f"default-address-pools entry {pool!r} needs base (a CIDR) and size (a number)")
    runtimes = config.get("runtimes", {})
    if expect("runtimes", dict, "an object"):
        for name, runtime in runtimes.items():
            if not isinstance(runtime, dict) or not isinstance(runtime.get("path"), str):
                errors.append(f"runtime {name} needs a path")
    default_runtime = config.get("default-runtime")
    if isinstance(default_runtime, str) and default_runtime not in ("runc", *runtimes):
        errors.append(f"default-runtime {default_runtime} is not runc or a configured runtime")
    return errors


def main() -> int:
    try:
        with open(sys.argv[1], encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        print(f"{sys.argv[1]}: {exc}", file=sys.stderr)
        return 1
    errors = check(config)
    for error in errors:
        print(f"{sys.argv[1]}: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
