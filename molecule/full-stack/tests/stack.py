"""What the full-stack tests share: the hosts, the tenant key and a question through the gateway."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import openai
import testinfra

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
PORT = int(os.environ.get("PLI_STACK_PORT", "18443"))
KEY = "sk-pli-stacktenant_0123456789abcdefghijklmnopqrstuv"
NODES = {"pli-stack-node1": "172.29.88.21", "pli-stack-node2": "172.29.88.22"}


def machine(name: str):
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY)


def ask(client: openai.OpenAI, content: str = "What is the capital of France?", max_tokens: int = 16) -> str:
    model = client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0
    )
    return response.choices[0].message.content or ""


def metric(node: str, name: str) -> float:
    """A node's /metrics series `name`, summed over its labels."""
    text = machine(node).check_output(f"curl -s http://{NODES[node]}:8000/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def status_on(address: str, bearer: str) -> tuple[str, str]:
    """A node's answer to GET /v1/models with this key or token, asked from the gateway: status and error code."""
    output = machine("pli-stack-gw").check_output(
        f"curl -s -w '\\n%{{http_code}}' http://{address}:8000/v1/models -H 'Authorization: Bearer {bearer}'"
    )
    body, _, status = output.rpartition("\n")
    code = json.loads(body).get("error", {}).get("code", "") if status != "200" else ""
    return status, code


DATABASE_URL = (
    "postgresql://pli_app:stack-postgresql-password-0123456789@172.29.88.10:5432/private_llm"
    "?sslmode=verify-full&sslrootcert=/etc/private-llm/pki/ca.pem"
)


def sql(query: str) -> str:
    return machine("pli-stack-gw").check_output(f"runuser -u postgres -- psql -d private_llm -tAc {shlex.quote(query)}")


def app_cli(*args: str) -> str:
    """The app's command line on a node, against the shared database (as the role runs it)."""
    python = "/opt/private-llm/current/venv/bin/python"
    words = [python, "-m", "app", *args, "--keys-db", "/srv/private-llm/app/keys.db"]
    return f"PLI_DATABASE_URL={shlex.quote(DATABASE_URL)} " + " ".join(shlex.quote(word) for word in words)


def wait_for(condition, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout_s} s: {what}")


class Failure(NamedTuple):
    """A request that failed: when (time.time(), after the answer came), its error code if it had one, what."""

    at: float
    code: str | None
    error: str


# The gateway allows 10 requests a second from one address (nginx_limit_req_per_ip_rate), and all the test
# clients share one. Each ask() is two requests, so four clients starting one ask a second stay at 8 a
# second however fast the nodes answer: a 429 from the gateway is then a failure, never the load's own doing.
ASK_INTERVAL_S = 1.0


@contextmanager
def clients_asking(
    client: openai.OpenAI, count: int = 4, limit: int = 3000
) -> Iterator[tuple[list[str], list[Failure]]]:
    """`count` clients asking through the gateway for as long as the block runs (at most `limit` requests in
    all, each client at most one question a second): the answers, and every failure whatever its type, as
    they come."""
    answered: list[str] = []
    errors: list[Failure] = []
    done = threading.Event()

    def keep_asking() -> None:
        while not done.is_set() and len(answered) + len(errors) < limit:
            started = time.monotonic()
            try:
                answered.append(ask(client, "Say the number seven.", max_tokens=4))
            except Exception as exc:  # every failure counts, whatever its type
                code = exc.code if isinstance(exc, openai.APIStatusError) else None
                errors.append(Failure(time.time(), code, repr(exc)))
            done.wait(max(0.0, started + ASK_INTERVAL_S - time.monotonic()))

    threads = [threading.Thread(target=keep_asking) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield answered, errors
    finally:
        done.set()
        for thread in threads:
            thread.join(300)


def run_playbook(playbook: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """One of the repository's playbooks against the scenario's hosts, as an operator runs it."""
    repo = Path(__file__).resolve().parents[3]
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(repo / "roles"),
        "ANSIBLE_COLLECTIONS_PATH": str(repo / "collections"),
        "ANSIBLE_FORCE_COLOR": "false",
    }
    command = [str(Path(sys.executable).parent / "ansible-playbook"), str(repo / playbook)]
    command += ["-i", str(Path(INVENTORY).parent), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
