"""Verify inference_app_runtime: docker: the app's image built on the host, run hardened by systemd. The API
and key checks both runtimes share are in ../../shared/test_app_api.py."""

from __future__ import annotations

import json

import pytest

CONTAINER = "private-llm-app"


def inspect(host, template: str) -> str:
    return host.check_output(f"docker inspect --format '{template}' {CONTAINER}")


def test_unit_runs_the_release_image(host):
    assert host.service("private-llm-app").is_running
    assert host.service("private-llm-app").is_enabled
    release_image = host.file("/opt/private-llm/current/image.env").content_string.strip().split("=", 1)[1]
    assert inspect(host, "{{.Config.Image}}") == release_image
    assert release_image.startswith("private-llm-app:")
    assert host.check_output(f"docker image inspect --format '{{{{.Config.Labels}}}}' {release_image}").count(
        "private-llm.environment"
    )


def test_release_has_no_host_environment(host):
    release = host.file("/opt/private-llm/current").linked_to
    assert host.file(f"{release}/app.yaml").exists
    assert not host.file(f"{release}/venv").exists
    assert not host.file("/opt/private-llm/build").exists, "the build context (wheels) is removed after the build"


def test_container_runs_as_the_service_user(host):
    uid = host.user("llm").uid
    gid = host.group("llm").gid
    assert inspect(host, "{{.Config.User}}") == f"{uid}:{gid}"
    pid = inspect(host, "{{.State.Pid}}")
    assert host.check_output(f"ps -o user= -p {pid}") == "llm"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{.HostConfig.ReadonlyRootfs}}", "true"),
        ("{{.HostConfig.CapDrop}}", "[ALL]"),
        ("{{.HostConfig.SecurityOpt}}", "[no-new-privileges]"),
        ("{{.HostConfig.NetworkMode}}", "host"),
        ("{{.HostConfig.Memory}}", str(6 * 1024**3)),
        ("{{.HostConfig.PidsLimit}}", "4096"),
    ],
)
def test_container_is_hardened(host, template, expected):
    assert inspect(host, template) == expected


def test_only_the_data_directory_is_writable(host):
    # `docker exec` cannot enter containers of a nested engine here (setns is refused), so the writable
    # paths are read from the container's configuration; ReadonlyRootfs is checked above.
    mounts = json.loads(inspect(host, "{{json .Mounts}}"))
    writable = sorted(m["Destination"] for m in mounts if m["RW"])
    assert writable == ["/var/lib/private-llm"], mounts
    assert {m["Destination"] for m in mounts if not m["RW"]} == {"/etc/private-llm/app.yaml"}, mounts
    # The app did write there from inside: the embedded model converted into its cache.
    converted = host.file("/var/lib/private-llm/models/cache/smollm2-135m-instruct/config.json")
    assert converted.exists
    assert converted.user == "llm"


def test_app_logs_reach_the_journal(host):
    journal = host.check_output("journalctl -u private-llm-app -o cat --no-pager")
    # json.dumps default separators: the app's own log line, through docker run's attached output.
    assert '"message": "ready"' in journal


def test_stop_drains_and_exits_zero_then_restarts(host):
    host.check_output("systemctl stop private-llm-app")
    assert host.check_output("systemctl show -p ExecMainStatus --value private-llm-app") == "0"
    assert host.run(f"docker inspect {CONTAINER}").rc != 0, "the container is removed with the unit"
    host.check_output("systemctl start private-llm-app")
    # curl retries 503 (loading) and refused connections (starting) for up to four minutes.
    host.check_output("curl -sf --retry 80 --retry-delay 3 --retry-all-errors -o /dev/null http://127.0.0.1:8000/ready")
