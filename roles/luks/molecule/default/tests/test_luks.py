"""Verify the luks role with cryptsetup on files (no device-mapper on CI machines)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import testinfra

PREFIX = os.environ.get("PLI_INSTANCE", "pli-luks")
testinfra_hosts = [f"ansible://{PREFIX}"]
VAULT = "/srv/luks/vault.img"

NO_DM = (
    "the CI kernel has no device-mapper (dm-crypt): `cryptsetup open`, mkfs on the mapping and "
    "mounting cannot run here; crypttab/fstab entries are checked instead"
)
ROTATED = "/root/rotated-away-data.key"


def rotated(host) -> bool:
    return host.file(ROTATED).exists


def opens(host, device: str, key_file: str | None = None, passphrase: str | None = None) -> bool:
    if passphrase is not None:
        return host.run(f"printf %s '{passphrase}' | cryptsetup open --test-passphrase {device} --key-file -").rc == 0
    return host.run(f"cryptsetup open --test-passphrase {device} --key-file {key_file}").rc == 0


@pytest.mark.parametrize("device", ["/srv/luks/data.img", "/srv/luks/secrets.img"])
def test_volume_is_luks2_with_argon2id_and_one_slot(host, device):
    assert host.run(f"cryptsetup isLuks {device}").rc == 0
    dump = host.check_output(f"cryptsetup luksDump {device}")
    assert re.search(r"^Version:\s+2$", dump, re.M)
    assert "PBKDF:      argon2id" in dump
    assert dump.count(": luks2") == 1  # exactly one keyslot


def test_keyfile_is_root_only_and_opens_the_volume(host):
    key = host.file("/etc/luks-keys/data.key")
    assert key.mode == 0o400
    assert key.user == "root"
    assert key.size == 4096
    assert opens(host, "/srv/luks/data.img", key_file="/etc/luks-keys/data.key")


def test_passphrase_opens_the_vaulted_volume(host):
    passphrase = "molecule-rotated-passphrase" if rotated(host) else "molecule-only-passphrase"
    assert opens(host, "/srv/luks/secrets.img", passphrase=passphrase)
    assert not opens(host, "/srv/luks/secrets.img", passphrase="wrong-passphrase")


def test_device_with_a_filesystem_was_left_untouched(host):
    assert host.run("cryptsetup isLuks /srv/luks/precious.img").rc != 0
    assert 'TYPE="ext4"' in host.check_output("blkid -p -o export /srv/luks/precious.img").replace(
        "TYPE=ext4", 'TYPE="ext4"'
    )
    assert "precious" not in host.file("/etc/crypttab").content_string


def test_crypttab_records_both_volumes(host):
    lines = [line.split() for line in host.file("/etc/crypttab").content_string.splitlines() if line.strip()]
    entries = {fields[0]: fields for fields in lines if not fields[0].startswith("#")}
    assert entries["data"][1:] == ["/srv/luks/data.img", "/etc/luks-keys/data.key", "luks,discard,nofail"]
    assert entries["secrets"][1:] == ["/srv/luks/secrets.img", "none", "luks,discard,nofail"]


def test_fstab_records_the_mounts_with_nofail(host):
    fstab = host.file("/etc/fstab").content_string
    assert "/dev/mapper/data /srv/private-llm ext4 defaults,nofail" in fstab
    assert "/dev/mapper/secrets /srv/private-llm-secrets ext4 defaults,nofail" in fstab


def test_header_backups_reach_the_controller(host):
    # The role's default place: the controller user's data directory, private, outside the inventory.
    backups = Path(os.environ["LUKS_HEADER_BACKUP_DIR"])
    assert backups.stat().st_mode & 0o777 == 0o700
    inventory = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
    assert inventory not in backups.parents, "header backups inside the inventory would be parsed as inventory"
    backup_dir = backups / host.backend.get_hostname()
    for name in ("data", "secrets"):
        header = backup_dir / f"{name}.header"
        assert header.stat().st_size > 0
        on_host = host.file(f"/var/backups/private-llm-infra/luks/{name}.header")
        assert on_host.mode == 0o400
        assert host.run(f"cryptsetup isLuks /var/backups/private-llm-infra/luks/{name}.header").rc == 0


def test_volumes_are_opened_and_mounted(host):
    if "crypt" not in host.run("dmsetup targets").stdout:
        pytest.skip(NO_DM)
    assert host.mount_point("/srv/private-llm").exists
    assert host.file("/srv/private-llm/models").is_directory


def test_rotation_replaced_the_keys(host):
    if not rotated(host):
        pytest.skip("runs in the verify after molecule's side_effect (key rotation)")
    assert not opens(host, "/srv/luks/data.img", key_file=ROTATED)
    assert opens(host, "/srv/luks/data.img", key_file="/etc/luks-keys/data.key")
    assert not host.file("/etc/luks-keys/data.key.next").exists
    assert not opens(host, "/srv/luks/secrets.img", passphrase="molecule-only-passphrase")
    assert not host.file("/run/luks-rotate-secrets.old").exists


@pytest.fixture(scope="module")
def tang():
    return testinfra.get_host(f"ansible://{PREFIX}-tang", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])


def tang_unlock(host) -> int:
    """What systemd-cryptsetup gets from Clevis at boot, checked against the volume without mapping it."""
    slot = host.check_output(f"clevis luks list -d {VAULT}").split(":", 1)[0]
    pipeline = f"clevis luks pass -d {VAULT} -s {slot} | cryptsetup open --test-passphrase --key-file - {VAULT}"
    return host.run(f"bash -o pipefail -c '{pipeline}'").rc


def test_tang_bound_volume_keeps_no_key_on_this_disk(host):
    assert not host.file("/etc/luks-keys/vault.key").exists
    assert f"http://{PREFIX}-tang:7500" in host.check_output(f"clevis luks list -d {VAULT}")
    dump = host.check_output(f"cryptsetup luksDump {VAULT}")
    assert dump.count(": luks2") == 2, "the Clevis slot and the recovery passphrase, no keyfile slot"
    assert "clevis" in dump


def test_tang_unlocks_the_volume_only_while_it_answers(host, tang):
    assert tang_unlock(host) == 0
    tang.check_output("systemctl stop tangd.socket")
    try:
        assert tang_unlock(host) != 0, "with the Tang server gone, nothing on this host opens the volume"
    finally:
        tang.check_output("systemctl start tangd.socket")
    assert tang_unlock(host) == 0


def test_recovery_passphrase_opens_the_tang_volume(host):
    assert opens(host, VAULT, passphrase="molecule-only-recovery")


def test_tang_volume_waits_for_the_network_at_boot(host):
    line = next(line for line in host.file("/etc/crypttab").content_string.splitlines() if line.startswith("vault "))
    assert " none " in line
    assert "_netdev" in line
    assert host.service("clevis-luks-askpass.path").is_enabled


def test_tang_volume_opens_at_boot():
    pytest.skip(
        "unlocking at boot (systemd-cryptsetup asks, clevis-luks-askpass answers from the Tang server) maps the "
        "volume with dm-crypt, which this kernel lacks; the material it uses is proven above"
    )
