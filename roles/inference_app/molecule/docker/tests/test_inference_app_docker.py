"""Verify inference_app_runtime: docker: the app's image built on the host, run hardened by systemd."""

from __future__ import annotations

import json
import time

import pytest

KEY = "sk-pli-moleculetenant_0123456789abcdefghijklmnopqrstuv"
BASE = "http://127.0.0.1:8000"
CONTAINER = "private-llm-app"


def inspect(host, template: str) -> str:
    return host.check_output(f"docker inspect --format '{template}' {CONTAINER}")


def chat(host, key: str = KEY) -> tuple[int, dict]:
    body = json.dumps(
        {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24,
            "temperature": 0,
        }
    )
    out = host.check_output(
        f"curl -s -w '\\n%{{http_code}}' -H 'Content-Type: application/json' -H 'Authorization: Bearer {key}' "
        f"-d '{body}' {BASE}/v1/chat/completions"
    )
    payload, status = out.rsplit("\n", 1)
    return int(status), json.loads(payload)


def wait_ready(host, seconds: int = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if host.run(f"curl -sf -o /dev/null {BASE}/ready").rc == 0:
            return
        time.sleep(3)
    pytest.fail(f"/ready not 200 within {seconds} s")


@pytest.fixture(scope="module", autouse=True)
def curl(host):
    if not host.exists("curl"):
        host.check_output("apt-get install -y -qq curl >/dev/null")


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


def test_ready_and_answers_with_the_vault_key(host):
    wait_ready(host)
    status, body = chat(host)
    assert status == 200, body
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_unknown_key_is_refused(host):
    status, body = chat(host, key="sk-pli-unknown_0123456789abcdefghijklmnop")
    assert status == 401
    assert body["error"]["type"]


def test_keys_were_loaded_as_hashes_by_the_service_user(host):
    db = host.file("/var/lib/private-llm/keys.db")
    assert db.user == "llm"
    assert db.mode == 0o600
    assert host.run("grep -c 0123456789abcdefghijklmnopqrstuv /var/lib/private-llm/keys.db").stdout.strip() == "0"


def test_app_logs_reach_the_journal_without_secrets(host):
    journal = host.check_output("journalctl -u private-llm-app -o cat --no-pager")
    # json.dumps default separators: the app's own log line, through docker run's attached output.
    assert '"message": "ready"' in journal
    assert "0123456789abcdefghijklmnopqrstuv" not in host.check_output("journalctl -o cat --no-pager")


def test_stop_drains_and_exits_zero_then_restarts(host):
    host.check_output("systemctl stop private-llm-app")
    assert host.check_output("systemctl show -p ExecMainStatus --value private-llm-app") == "0"
    assert host.run(f"docker inspect {CONTAINER}").rc != 0, "the container is removed with the unit"
    host.check_output("systemctl start private-llm-app")
    wait_ready(host)
    assert chat(host)[0] == 200
