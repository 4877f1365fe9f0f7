"""The example inventories are complete: every vault_ variable they use has an entry in the vault example
an operator copies, and each sets the address and port convention every role requires."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

INVENTORIES = Path(__file__).resolve().parent.parent / "inventories"
EXAMPLES = sorted(path.parent.parent.parent.name for path in INVENTORIES.glob("*/group_vars/all/vault.yml.example"))


def test_the_production_and_staging_examples_have_a_vault_example():
    assert {"prod", "staging"} <= set(EXAMPLES)


@pytest.mark.parametrize("inventory", EXAMPLES)
def test_every_vault_variable_the_inventory_uses_is_in_its_vault_example(inventory):
    root = INVENTORIES / inventory
    used = {
        name
        for path in root.rglob("*.yml")
        for name in re.findall(r"\bvault_[a-z0-9_]+", path.read_text(encoding="utf-8"))
    }
    example = yaml.safe_load((root / "group_vars/all/vault.yml.example").read_text(encoding="utf-8"))
    assert sorted(used - set(example)) == [], "used but missing from vault.yml.example"
    assert sorted(set(example) - used) == [], "in vault.yml.example but used nowhere"


@pytest.mark.parametrize("inventory", sorted(path.name for path in INVENTORIES.iterdir() if path.is_dir()))
def test_every_inventory_sets_the_address_and_port_convention(inventory):
    shared = yaml.safe_load((INVENTORIES / inventory / "group_vars/all/main.yml").read_text(encoding="utf-8"))
    assert "pli_address" in shared
    ports = {
        "app",
        "postgresql",
        "redis",
        "tang",
        "node_exporter",
        "nginx_exporter",
        "nginx_status",
        "nginx_log_exporter",
        "postgres_exporter",
        "redis_exporter",
    }
    assert set(shared["pli_ports"]) == ports
