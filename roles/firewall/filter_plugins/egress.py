"""private_llm_egress_destinations: the firewall role's egress entries, normalised for the template."""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from ansible.errors import AnsibleFilterError

DEFAULT_PORTS = [80, 443]


def _literal(target: str) -> bool:
    try:
        ipaddress.ip_network(target, strict=False)
    except ValueError:
        return False
    return True


def destinations(entries: list[Any]) -> list[dict[str, Any]]:
    """Each entry (a URL, "host:port", a host name, an address or CIDR, or {to, ports, proto, comment})
    as {name, to, ports, proto, comment, host or cidr}: `host` is resolved on the target into the sets
    named after `name`, `cidr` goes into the rule as it is."""
    out = []
    for index, entry in enumerate(entries, start=1):
        spec = dict(entry) if isinstance(entry, dict) else {"to": entry}
        to = str(spec.get("to") or "")
        if not to:
            raise AnsibleFilterError(f"firewall egress entry {index} has no destination ('to'): {entry!r}")
        if "://" in to:
            url = urlsplit(to)
            target = url.hostname or ""
            ports = [url.port or (443 if url.scheme == "https" else 80)]
        elif to.count(":") == 1 and to.rsplit(":", 1)[1].isdigit():
            target, port = to.rsplit(":", 1)
            ports = [int(port)]
        else:
            target, ports = to, DEFAULT_PORTS
        ports = [int(port) for port in spec.get("ports", ports)]
        proto = spec.get("proto", "tcp")
        if proto not in ("tcp", "udp") or not ports or not target:
            raise AnsibleFilterError(f"firewall egress entry {index} ({to}): needs a host and ports, proto tcp|udp")
        literal = _literal(target)
        out.append(
            {
                "name": f"dst_{index}",
                "to": to,
                "ports": ports,
                "proto": proto,
                "comment": str(spec.get("comment", to)).replace('"', "'"),
                "cidr": target if literal else "",
                "host": "" if literal else target,
                "ipv6": literal and ":" in target,
            }
        )
    return out


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"private_llm_egress_destinations": destinations}
