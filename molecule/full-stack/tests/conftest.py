"""Fixtures of the full-stack tests: Pebble's root and an openai client through the gateway."""

from __future__ import annotations

import ssl
from collections.abc import Callable

import httpx
import openai
import pytest
from stack import KEY, PORT, machine


@pytest.fixture(scope="module")
def pebble_root(tmp_path_factory) -> str:
    acme = machine("pli-stack-acme")
    pem = acme.check_output("curl -sfk https://acme.pli.test:15000/roots/0")
    path = tmp_path_factory.mktemp("pebble") / "root.pem"
    path.write_text(pem + "\n")
    return str(path)


@pytest.fixture(scope="module")
def client_for(pebble_root) -> Callable[[str], openai.OpenAI]:
    # 127.0.0.1 reaches the gateway through its published port, so the certificate's name
    # (gateway.pli.test) cannot match the URL: the chain is still verified against Pebble's root.
    # Hostname verification is proven from the ACME container in test_gateway_name_verifies.
    def make(key: str) -> openai.OpenAI:
        context = ssl.create_default_context(cafile=pebble_root)
        context.check_hostname = False
        http_client = httpx.Client(verify=context, timeout=120)
        base_url = f"https://127.0.0.1:{PORT}/v1"
        return openai.OpenAI(base_url=base_url, api_key=key, http_client=http_client, max_retries=0)

    return make


@pytest.fixture(scope="module")
def client(client_for) -> openai.OpenAI:
    return client_for(KEY)
