"""Verify the nvidia_driver role on a container without a GPU (packages, holds, blacklists, units)."""

from __future__ import annotations

import pytest

PACKAGES = ["nvidia-kernel-dkms", "nvidia-smi", "libcuda1", "libnvidia-ml1", "nvidia-persistenced", "firmware-nvidia-gsp"]
NO_GPU = "no NVIDIA GPU on CI machines: module load and `nvidia-smi -L` run only on GPU hosts"
NO_HEADERS = (
    "the container runs the CI VM's kernel, which has no Debian headers package (molecule sets "
    "nvidia_driver_kernel_headers: false), so DKMS has nothing to build against here"
)


def has_gpu(host) -> bool:
    return host.run("grep -qx 0x10de /sys/bus/pci/devices/*/vendor").rc == 0


def test_non_free_sources_cover_main_and_security_archives(host):
    sources = host.file("/etc/apt/sources.list.d/private-llm-infra-nvidia-nonfree.sources").content_string
    assert "Components: contrib non-free non-free-firmware" in sources
    assert "Suites: bookworm bookworm-updates" in sources
    assert "Suites: bookworm-security" in sources


@pytest.mark.parametrize("name", PACKAGES)
def test_driver_package_is_installed_and_held(host, name):
    assert host.package(name).is_installed
    assert name in host.check_output("apt-mark showhold").split()


def test_unattended_upgrades_blacklist_covers_the_driver(host):
    dump = host.check_output("apt-config dump Unattended-Upgrade::Package-Blacklist")
    for pattern in ("nvidia-", "libnvidia-", "libcuda", "firmware-nvidia-"):
        assert f'"{pattern}"' in dump


def test_held_driver_is_not_upgradable_by_apt(host):
    # A plain upgrade must keep every held package back.
    simulated = host.check_output("apt-get -s -o Debug::NoLocking=1 dist-upgrade")
    assert not any(line.startswith("Inst nvidia-smi") for line in simulated.splitlines())


def test_nouveau_is_blacklisted(host):
    config = host.check_output("modprobe --showconfig")
    assert "blacklist nouveau" in config
    assert "options nouveau modeset=0" in config


def test_persistence_daemon_is_enabled(host):
    assert host.service("nvidia-persistenced").is_enabled


def test_dkms_knows_the_module_source(host):
    assert "nvidia-current" in host.check_output("dkms status")


def test_module_is_built_for_the_running_kernel(host):
    pytest.skip(NO_HEADERS)


def test_gpus_are_listed(host):
    if not has_gpu(host):
        pytest.skip(NO_GPU)
    assert "GPU 0" in host.check_output("nvidia-smi -L")
