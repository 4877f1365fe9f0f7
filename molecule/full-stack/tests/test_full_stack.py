"""The whole service from the controller: the official openai client through the gateway over TLS."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from cryptography import x509
from stack import INVENTORY, NODES, PORT, ask, clients_asking, machine, metric, run_playbook

testinfra_hosts = ["ansible://pli-stack-gw"]


def test_gateway_name_verifies():
    acme = machine("pli-stack-acme")
    acme.check_output("curl -sfk https://acme.pli.test:15000/roots/0 -o /tmp/root.pem")
    out = acme.check_output(
        "curl -s -o /dev/null -w '%{http_code}' --cacert /tmp/root.pem https://gateway.pli.test/health"
    )
    assert out == "200"


def test_openai_client_gets_an_answer(client):
    assert "Paris" in ask(client)


def test_openai_client_streams(client):
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 1


def test_requests_are_spread_across_both_nodes(client):
    before = {node: metric(node, "vllm:request_success_total") for node in NODES}
    with ThreadPoolExecutor(max_workers=4) as pool:
        # Routing is what is checked here, not the answers: a few tokens each.
        list(pool.map(lambda _: ask(client, "Say hi.", max_tokens=4), range(12)))
    after = {node: metric(node, "vllm:request_success_total") for node in NODES}
    assert all(after[node] > before[node] for node in NODES), (before, after)


def test_stopping_one_node_fails_no_request(client):
    """Four clients keep asking while one node is stopped (it drains) and started again. Counted in
    answers, not seconds: some before the stop, a dozen while only the other node serves."""
    node = machine("pli-stack-node1")
    with clients_asking(client) as (answered, errors):

        def wait_for_answers(count: int) -> None:
            deadline = time.monotonic() + 300
            while len(answered) < count and not errors and time.monotonic() < deadline:
                time.sleep(0.2)

        try:
            wait_for_answers(4)
            before_stop = len(answered)
            node.check_output("systemctl stop private-llm-app")
            wait_for_answers(before_stop + 12)
            during_stop = len(answered) - before_stop
        finally:
            node.check_output("systemctl start private-llm-app")
    assert errors == [], errors
    assert before_stop >= 4 and during_stop >= 12, (before_stop, during_stop)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if node.run(f"curl -sf http://{NODES['pli-stack-node1']}:8000/ready").rc == 0:
            break
        time.sleep(3)


def test_app_port_is_closed_to_anyone_but_the_gateway(host):
    outsider = machine("pli-stack-acme")
    probe = "python3 -c \"import socket; socket.create_connection(('{ip}', 8000), timeout=3)\""
    for ip in NODES.values():
        assert outsider.run(probe.format(ip=ip)).rc != 0
        assert host.run(probe.format(ip=ip)).rc == 0


def test_the_gateway_logs_the_key_id_and_tenant_and_the_client_never_sees_them(client, host):
    model = client.models.list().data[0].id
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Hi."}], max_tokens=2
    )
    assert not [name for name in raw.headers if name.lower().startswith("x-pli-")], dict(raw.headers)
    request_id = raw.headers["x-request-id"]
    lines = host.file("/var/log/nginx/access.json.log").content_string.splitlines()
    (entry,) = [entry for line in lines if (entry := json.loads(line))["request_id"] == request_id]
    assert (entry["key_id"], entry["tenant"], entry["status"]) == ("stacktenant", "stack-tenant", 200)


def test_unauthenticated_requests_get_openai_errors(pebble_root):
    context = ssl.create_default_context(cafile=pebble_root)
    context.check_hostname = False
    response = httpx.get(f"https://127.0.0.1:{PORT}/v1/models", verify=context)
    assert response.status_code == 401
    assert json.loads(response.text)["error"]["type"]


@pytest.mark.parametrize("name", sorted(NODES))
def test_app_data_is_kept_where_the_encrypted_volume_mounts(name):
    """The data directory defaults onto the first LUKS volume (/srv/private-llm/app). This kernel has
    no dm-crypt, so the volume is formatted but not opened: the app role accepted the directory only
    because the inventory says inference_app_allow_unencrypted_data (and refuses otherwise, below)."""
    node = machine(name)
    release = node.file("/opt/private-llm/current").linked_to
    settings = yaml.safe_load(node.file(f"{release}/app.yaml").content_string)
    assert settings["keys_db"] == "/srv/private-llm/app/keys.db"
    assert settings["model_cache_dir"] == "/srv/private-llm/app/models/cache"
    # Keys and the ledger are in the state host's PostgreSQL: no local copy of either.
    assert settings["database_url"].startswith("postgresql://pli_app:")
    assert not node.file("/srv/private-llm/app/keys.db").exists
    assert node.file("/srv/private-llm/app/models/cache/smollm2-135m-instruct/config.json").exists
    assert (
        "ReadWritePaths=/srv/private-llm/app" in node.file("/etc/systemd/system/private-llm-app.service").content_string
    )
    assert node.run("cryptsetup isLuks /srv/luks/data.img").rc == 0
    assert " /srv/private-llm " in node.file("/etc/fstab").content_string


def test_the_app_role_refuses_a_data_directory_on_a_plain_disk(tmp_path):
    """The same role against the same node, without the inventory's permission: the play stops before
    touching the release, naming the directory and the way out."""
    playbook = tmp_path / "refuse.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "pli-stack-node1",
                    "gather_facts": True,
                    "tasks": [
                        {
                            "ansible.builtin.include_role": {"name": "inference_app", "tasks_from": "encryption.yml"},
                            "vars": {"inference_app_allow_unencrypted_data": False},
                        }
                    ],
                }
            ]
        )
    )
    result = subprocess.run(
        ["ansible-playbook", "-i", INVENTORY, str(playbook)], capture_output=True, text=True, check=False, timeout=300
    )
    output = result.stdout + result.stderr  # ansible-core 2.19 writes task errors to stderr
    assert result.returncode != 0, output
    assert "/srv/private-llm/app is on" in output
    assert "not on an encrypted volume" in output


def test_the_gateway_proxies_to_each_nodes_address_on_the_app_port(host):
    """nginx's upstream, the app's listener and the firewall's opening come from one pli_address and
    pli_ports.app per node (README: Addresses and ports)."""
    config = host.check_output("nginx -T 2>/dev/null")
    for node, address in NODES.items():
        assert f"server {address}:8000 " in config
        assert machine(node).socket(f"tcp://{address}:8000").is_listening


def test_prompt_bodies_are_buffered_in_memory_at_the_gateway(host):
    config = host.check_output("nginx -T 2>/dev/null")
    assert "client_body_temp_path /run/nginx-client-body" in config
    assert "proxy_max_temp_file_size 0" in config
    assert host.check_output("findmnt -n -o FSTYPE -T /run") == "tmpfs"


def changed_tasks(output: str) -> list[str]:
    """Each `changed:` line of a play's output under the task it belongs to."""
    task, found = "", []
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line.rstrip(" *")
        elif line.startswith("changed:"):
            found.append(f"{task}: {line}")
    return found


def run_site(*arguments: str) -> subprocess.CompletedProcess[str]:
    """site.yml against the scenario's hosts, as an operator runs it from the repository."""
    return run_playbook("site.yml", *arguments)


@pytest.mark.parametrize(
    ("tags", "check"),
    [("gateway", True), ("app", True), ("app-keys", False), ("state", True), ("monitoring", True)],
    ids=["gateway-check", "app-check", "app-keys", "state-check", "monitoring-check"],
)
def test_a_documented_tag_runs_alone_on_the_converged_hosts(tags: str, check: bool) -> None:
    """The README's `--check --diff --tags gateway` and `--tags app`, the app role's `app-keys`, and the state
    and monitoring plays in check mode, each run on their own (the plays their tags skip still validate
    arguments, without facts) and change nothing on hosts that are already converged."""
    result = run_site("--tags", tags, *(["--check", "--diff"] if check else []))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    recap = re.findall(r"changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", result.stdout)
    assert len(recap) == 3, result.stdout[-2000:]  # the gateway and the two nodes
    assert all(counts == ("0", "0", "0") for counts in recap), "\n".join(changed_tasks(result.stdout))


def served_certificate(pebble_root: str) -> x509.Certificate:
    """The certificate the gateway serves, read over a verified TLS handshake through its published port."""
    context = ssl.create_default_context(cafile=pebble_root)
    context.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", PORT), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="gateway.pli.test") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_gateway_certificate_rotates_under_load_with_no_failed_request(client, pebble_root):
    """playbooks/rotate-tls.yml while four clients ask: a forced ACME renewal, a reload, the controller's
    check of the served serial; every request answered, and the gateway serves a new certificate from the
    same CA for the same name."""
    before = served_certificate(pebble_root)
    with clients_asking(client) as (answered, errors):
        result = run_playbook("playbooks/rotate-tls.yml")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert errors == [], errors[:5]
    print(f"{len(answered)} requests answered during the rotation, none failed")
    after = served_certificate(pebble_root)
    assert after.serial_number != before.serial_number
    assert after.issuer == before.issuer
    names = after.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gateway.pli.test" in names.get_values_for_type(x509.DNSName)
    assert f"serves serial {after.serial_number} until" in result.stdout


def restart_times(node: str, since: float) -> tuple[float, float]:
    """When the app's unit began to stop after `since`, and when the process after it logged `ready` (its
    model loaded and serving), from the node's journal (one kernel: one clock for every container)."""
    journal = machine(node).check_output(f"journalctl -u private-llm-app -o json --no-pager --since @{int(since)}")
    events = [(int(e["__REALTIME_TIMESTAMP"]) / 1e6, e.get("MESSAGE")) for e in map(json.loads, journal.splitlines())]
    events = [(at, message) for at, message in events if at >= since and isinstance(message, str)]
    stop = next(at for at, message in events if message.startswith("Stopping"))
    ready = next(
        at
        for at, message in events
        if at > stop and message.startswith("{") and json.loads(message).get("message") == "ready"
    )
    return stop, ready


# Last in this file on purpose: it leaves the nodes on a setting the inventory does not hold, which the
# check-mode runs above would report as a change (the tests after this file need both nodes serving, which
# its end waits for).
def test_a_setting_change_rolls_over_the_nodes_with_no_failed_request(client):
    """A changed setting restarts every node, one node at a time: the next one stops only once the first
    has its model loaded again, and four clients asking through the gateway all along get an answer every
    time."""
    started = time.time()
    with clients_asking(client) as (answered, errors):
        result = run_site("--tags", "app", "-e", json.dumps({"inference_app_max_queued_requests": 63}))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert errors == [], errors[:5]
    times = {node: restart_times(node, started) for node in NODES}
    first, second = sorted(NODES, key=lambda node: times[node][0])
    assert times[second][0] > times[first][1], f"both nodes were down at once: {times}"
    assert len(answered) >= 12, len(answered)
    # nginx rests a node that refused connections during its restart (nginx_upstream_fail_timeout): the
    # rollout is over once the gateway sends requests to both nodes again. One request per turn (ask()
    # sends two, and round robin would then give every completion to the same node).
    model = client.models.list().data[0].id
    served = {node: metric(node, "vllm:request_success_total") for node in NODES}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi."}], max_tokens=2)
        if all(metric(node, "vllm:request_success_total") > served[node] for node in NODES):
            break
    assert all(metric(node, "vllm:request_success_total") > served[node] for node in NODES), "a node left the rotation"
