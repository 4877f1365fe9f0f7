"""Verify the app role (venv runtime): a hardened service and its releases. The API and key checks both
runtimes share are in ../../shared/test_app_api.py."""

from __future__ import annotations

import json
import time

import pytest

READY = "http://127.0.0.1:8000/ready"


def test_service_runs_as_the_service_user_and_is_enabled(host):
    service = host.service("private-llm-app")
    assert service.is_running
    assert service.is_enabled
    main_pid = host.check_output("systemctl show -p MainPID --value private-llm-app")
    assert host.check_output(f"ps -o user= -p {main_pid}") == "llm"


@pytest.mark.parametrize(
    ("prop", "value"),
    [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("Restart", "on-failure"),
        ("NotifyAccess", "main"),
        ("WatchdogUSec", "10s"),
    ],
)
def test_unit_is_hardened(host, prop, value):
    assert host.check_output(f"systemctl show -p {prop} --value private-llm-app") == value


def test_only_the_data_directory_is_writable(host):
    assert "/var/lib/private-llm" in host.check_output("systemctl show -p ReadWritePaths --value private-llm-app")


def test_release_layout(host):
    current = host.file("/opt/private-llm/current")
    assert current.is_symlink
    release = current.linked_to
    assert release.startswith("/opt/private-llm/releases/")
    assert host.file(f"{release}/app.yaml").exists
    assert host.file(f"{release}/venv").is_symlink
    assert host.file(f"{release}/venv/.complete").exists
    assert len(host.check_output("ls /opt/private-llm/releases").split()) <= 3


def test_failed_deployments_kept_the_live_release(host):
    marker = host.file("/root/live-release-before-side-effect")
    if not marker.exists:
        pytest.skip("runs in the verify after molecule's side_effect (bad checksum, release that never gets ready)")
    assert host.file("/opt/private-llm/current").linked_to == marker.content_string.strip()
    assert not host.file("/var/lib/private-llm/models/0000000000000000/.unpacked").exists


LEAVER_KEY = "sk-pli-moleculeleaver_0123456789abcdefghijklmnopqrstuv"


def test_a_key_removed_from_the_vault_is_revoked_and_the_others_kept(host):
    if not host.file("/root/live-release-before-side-effect").exists:
        pytest.skip("runs in the verify after molecule's side_effect (which removes the leaver's key)")
    answer = host.check_output(f"curl -s -H 'Authorization: Bearer {LEAVER_KEY}' http://127.0.0.1:8000/v1/models")
    assert '"revoked_api_key"' in answer, answer
    kept = host.check_output(
        "curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer "
        "sk-pli-moleculetenant_0123456789abcdefghijklmnopqrstuv' http://127.0.0.1:8000/v1/models"
    )
    assert kept == "200"


def test_an_access_token_from_the_deployed_keyring_works_like_the_key(host):
    keyring = host.file("/var/lib/private-llm/jwt-keyring.yaml")
    assert (keyring.user, keyring.mode) == ("llm", 0o600)
    issued = json.loads(
        host.check_output(
            "curl -s -X POST -H 'Authorization: Bearer "
            "sk-pli-moleculetenant_0123456789abcdefghijklmnopqrstuv' http://127.0.0.1:8000/v1/auth/token"
        )
    )
    assert issued["token_type"] == "bearer" and issued["expires_in"] == 900, issued
    status = host.check_output(
        f"curl -s -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {issued['access_token']}' "
        "http://127.0.0.1:8000/v1/models"
    )
    assert status == "200"


def test_the_app_tells_systemd_it_is_ready(host):
    assert host.check_output("systemctl show -p StatusText --value private-llm-app") == "ready"


def _main_pid(host) -> int:
    return int(host.check_output("systemctl show -p MainPID --value private-llm-app"))


def _seconds_until_ready_again(host, old_pid: int) -> float:
    started = time.monotonic()
    while time.monotonic() - started < 240:
        pid = _main_pid(host)
        if pid not in (0, old_pid) and host.run(f"curl -sf -o /dev/null {READY}").rc == 0:
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"not ready again within 240 s: {host.check_output('systemctl status private-llm-app')}")


def test_a_killed_process_is_restarted_and_answers_again(host):
    pid = _main_pid(host)
    host.check_output("systemctl kill --signal=KILL private-llm-app")
    seconds = _seconds_until_ready_again(host, pid)
    # The target (under 15 s on an idle machine) is measured here and written in the README, not asserted:
    # this scenario shares the machine with others.
    print(f"ready again {seconds:.1f} s after SIGKILL")


def test_a_frozen_process_is_killed_by_the_watchdog_and_restarted(host):
    pid = _main_pid(host)
    since = host.check_output("date '+%Y-%m-%d %H:%M:%S'")
    host.check_output(f"kill -STOP {pid}")
    seconds = _seconds_until_ready_again(host, pid)
    journal = host.check_output(f"journalctl -u private-llm-app --since '{since}' --no-pager")
    assert "Watchdog timeout" in journal, journal
    print(f"ready again {seconds:.1f} s after the process froze (watchdog 10 s)")
