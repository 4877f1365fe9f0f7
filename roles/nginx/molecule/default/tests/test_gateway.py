"""Verify nginx + certbot (acme mode) against a real Pebble ACME server, over real TLS.

Client-side checks run from the ACME container: another machine on the scenario network.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import testinfra

PREFIX = os.environ.get("PLI_INSTANCE", "pli-nginx")
GATEWAY = f"{PREFIX}-gw"
CLIENT = f"{PREFIX}-acme"
NAME = "gateway.pli.test"
INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]

testinfra_hosts = [f"ansible://{GATEWAY}"]


@pytest.fixture(scope="module")
def client():
    client_host = testinfra.get_host(f"ansible://{CLIENT}", ansible_inventory=INVENTORY)
    # Pebble's issuing root is generated when pebble starts; trust exactly that one.
    client_host.check_output("curl -sfk https://acme.pli.test:15000/roots/0 -o /tmp/pebble-root.pem")
    return client_host


def run_client(client, *args: str) -> dict:
    return json.loads(client.check_output("pli-client " + " ".join(args)))


def served_certificate(client) -> str:
    return client.check_output(
        f"openssl s_client -connect {NAME}:443 -servername {NAME} -CAfile /tmp/pebble-root.pem"
        " -verify_return_error </dev/null 2>/dev/null | openssl x509 -noout -serial -ext subjectAltName -issuer"
    )


def test_config_is_valid(host):
    assert host.run("nginx -t").rc == 0
    assert host.service("nginx").is_running


def test_served_certificate_is_issued_by_pebble_for_the_name(client):
    details = served_certificate(client)
    assert f"DNS:{NAME}" in details
    assert "Pebble" in details  # the issuing intermediate's name


def test_certificate_is_ecdsa_p256(host):
    text = host.check_output("openssl x509 -in /etc/ssl/private-llm-infra/gateway.pli.test/fullchain.pem -noout -text")
    assert "id-ecPublicKey" in text
    assert "prime256v1" in text


def test_renewal_is_served_without_restarting_the_master(host, client):
    before_serial = served_certificate(client).splitlines()[0]
    master_before = host.check_output("cat /run/nginx.pid")
    host.check_output("certbot renew --force-renewal --no-random-sleep-on-renew")
    deadline = time.monotonic() + 30
    after_serial = before_serial
    while after_serial == before_serial and time.monotonic() < deadline:
        time.sleep(1)
        after_serial = served_certificate(client).splitlines()[0]
    assert after_serial != before_serial
    assert host.check_output("cat /run/nginx.pid") == master_before


def test_renewal_uses_the_distribution_timer(host):
    assert host.service("certbot.timer").is_enabled
    assert host.run("crontab -l").rc != 0 or "certbot" not in host.check_output("crontab -l")


def test_http_redirects_to_https_but_serves_challenges(client, host):
    headers = client.check_output(f"curl -s -o /dev/null -w '%{{http_code}} %{{redirect_url}}' http://{NAME}/v1/models")
    assert headers == f"301 https://{NAME}/v1/models"
    host.check_output(
        "echo token-body > /var/lib/private-llm-infra/acme/.well-known/acme-challenge/probe || (mkdir -p /var/lib/private-llm-infra/acme/.well-known/acme-challenge && echo token-body > /var/lib/private-llm-infra/acme/.well-known/acme-challenge/probe)"
    )
    try:
        body = client.check_output(f"curl -sf http://{NAME}/.well-known/acme-challenge/probe")
    finally:
        host.run("rm -f /var/lib/private-llm-infra/acme/.well-known/acme-challenge/probe")
    assert body == "token-body"


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_old_tls_versions_are_refused_by_the_server(client, version):
    result = run_client(client, "handshake", version)
    assert result["ok"] is False
    # The server's alert, not the client's refusal to offer the version.
    assert result["reason"] == "TLSV1_ALERT_PROTOCOL_VERSION"


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_current_tls_versions_work(client, version):
    assert run_client(client, "handshake", version)["ok"] is True


def test_security_headers(client):
    headers = client.check_output(f"curl -s -D - -o /dev/null --cacert /tmp/pebble-root.pem https://{NAME}/v1/models")
    assert "strict-transport-security: max-age=63072000" in headers.lower()
    assert "x-content-type-options: nosniff" in headers.lower()
    assert "server: nginx\r" in headers.lower()  # no version


PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@pytest.mark.parametrize(
    ("path", "policy"),
    [("/", PAGE_POLICY), ("/chat/chat.js", PAGE_POLICY), ("/v1/models", "default-src 'none'; frame-ancestors 'none'")],
)
def test_the_chat_page_gets_its_own_policy_and_the_api_keeps_its_own(client, path, policy):
    """One policy per answer: the page's (its scripts may run) where the app serves the chat page, the API's
    everywhere else; the upstream's own security headers never reach the client beside nginx's."""
    headers = client.check_output(f"curl -s -D - -o /dev/null --cacert /tmp/pebble-root.pem https://{NAME}{path}")
    lines = [line.strip().lower() for line in headers.splitlines()]
    policies = [line for line in lines if line.startswith("content-security-policy:")]
    assert policies == [f"content-security-policy: {policy}".lower()]
    assert [line for line in lines if line.startswith("x-content-type-options:")] == ["x-content-type-options: nosniff"]
    assert any(line.startswith("strict-transport-security: max-age=") for line in lines)


def test_burst_beyond_the_limit_gets_429_json(client):
    # 60 parallel requests against 10 r/s with a burst of 20: some must be turned away.
    result = run_client(client, "burst", "60", "/v1/models")
    assert len(result["statuses"]) == 60
    assert 429 in result["statuses"]
    assert 200 in result["statuses"]
    error = json.loads(result["rejected_body"])["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    # The refusal carries the same security headers as every other answer (and says when to retry).
    headers = result["rejected_headers"]
    assert headers["strict-transport-security"].startswith("max-age=")
    assert headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["retry-after"] == "1"


def test_event_stream_reaches_the_client_chunk_by_chunk(client):
    time.sleep(3)  # let the rate limiter forget the burst above
    result = run_client(client, "stream", "/v1/chat/completions")
    assert result["status"] == 200
    assert result["content_type"].startswith("text/event-stream")
    assert result["content_encoding"] is None
    arrivals = result["arrivals"]
    assert len(arrivals) == 6
    # The fixture sends an event every 0.5 s: buffered, all would arrive together at the end.
    assert arrivals[-1] - arrivals[0] > 1.5
    assert arrivals[1] - arrivals[0] > 0.3


def test_access_log_is_json_without_secrets(client, host):
    time.sleep(2)
    client.check_output(
        f"curl -s -o /dev/null --cacert /tmp/pebble-root.pem -H 'Authorization: Bearer sk-pli-never-logged'"
        f" 'https://{NAME}/v1/models?secret=query-never-logged'"
    )
    lines = host.file("/var/log/nginx/access.json.log").content_string.strip().splitlines()
    entries = [json.loads(line) for line in lines]
    assert entries[-1]["path"] == "/v1/models"
    # The upstream's key id and tenant are logged, and kept from the client.
    assert (entries[-1]["key_id"], entries[-1]["tenant"]) == ("fixturekey", "fixture-tenant")
    text = "\n".join(lines)
    assert "sk-pli-never-logged" not in text
    assert "query-never-logged" not in text
    headers = client.check_output(f"curl -s -o /dev/null -D - --cacert /tmp/pebble-root.pem https://{NAME}/v1/models")
    assert "x-pli-" not in headers.lower()


def test_logs_are_kept_180_days_by_a_rotation_logrotate_accepts(host):
    config = host.file("/etc/logrotate.d/nginx").content_string
    assert "/var/log/nginx/*.log" in config and "rotate 180" in config and "daily" in config
    host.check_output("logrotate --debug /etc/logrotate.d/nginx")


def test_metrics_are_not_public(client):
    out = client.check_output(f"curl -s -w ' %{{http_code}}' --cacert /tmp/pebble-root.pem https://{NAME}/metrics")
    body, status = out.rsplit(" ", 1)
    assert status == "404"
    assert json.loads(body)["error"]["code"] == "not_found"


def test_unreachable_upstream_answers_503_json(client, host):
    host.check_output("systemctl stop sse-fixture")
    try:
        time.sleep(1)
        out = client.check_output(
            f"curl -s -w ' %{{http_code}}' --cacert /tmp/pebble-root.pem https://{NAME}/v1/models"
        )
    finally:
        host.check_output("systemctl start sse-fixture")
    body, status = out.rsplit(" ", 1)
    assert status == "503"
    assert json.loads(body)["error"]["code"] == "service_unavailable"


def curl(client, *args: str) -> tuple[int, dict, str]:
    """Status, lower-cased headers and body of one request through the gateway."""
    out = client.check_output(
        "curl -s -D /tmp/headers -o /tmp/body -w '%{http_code}' --cacert /tmp/pebble-root.pem "
        + " ".join(args)
        + "; echo; cat /tmp/headers; echo; cat /tmp/body"
    )
    status, rest = out.split("\n", 1)
    head, _, body = rest.partition("\r\n\r\n")
    headers = {}
    for line in head.splitlines()[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status), headers, body.strip()


@pytest.mark.parametrize(
    ("args", "status", "code"),
    [
        (["-X", "TRACE", f"https://{NAME}/v1/models"], 405, "method_not_allowed"),
        # These three are HTTP/1.1's request line and headers (over HTTP/2 nginx resets the stream of an
        # oversize header instead, and a transfer coding is not a thing).
        (["--http1.1", f"'https://{NAME}/v1/{'a' * 9000}'"], 414, "uri_too_long"),
        (
            ["--http1.1", "-H", f"'X-Big: {'b' * 40000}'", f"https://{NAME}/v1/models"],
            400,
            "request_header_too_large",
        ),
        (
            ["--http1.1", "-H", "'Transfer-Encoding: gzip'", "-d", "x", f"https://{NAME}/v1/models"],
            501,
            "not_implemented",
        ),
        ([f"'https://{NAME}/v1/models?api_key=sk-pli-abc_in-the-url'"], 400, "credentials_in_url"),
    ],
    ids=["method", "uri", "header", "transfer-encoding", "key-in-url"],
)
def test_nginx_own_answers_are_api_json_with_security_headers(client, args, status, code):
    got, headers, body = curl(client, *args)
    assert got == status, body
    assert json.loads(body)["error"]["code"] == code
    assert headers["content-type"].startswith("application/json")
    assert headers["strict-transport-security"].startswith("max-age=")
    assert headers["x-content-type-options"] == "nosniff"


def test_a_key_in_the_url_reaches_no_log(client, host):
    curl(client, f"'https://{NAME}/v1/models?key=sk-pli-logme_0123456789abcdef'")
    logs = host.check_output("cat /var/log/nginx/access.json.log /var/log/nginx/error.log")
    assert "sk-pli-logme" not in logs


def test_redirect_names_the_configured_server_not_the_clients_host_header(client):
    out = client.check_output(
        f"curl -s -o /dev/null -w '%{{http_code}} %{{redirect_url}}' -H 'Host: evil.example' http://{NAME}/v1/models"
    )
    assert out == f"301 https://{NAME}/v1/models"


def test_metrics_below_the_path_are_not_public_or_redirected(client):
    got, headers, body = curl(client, f"https://{NAME}/metrics/")
    assert got == 404
    assert "location" not in headers
    assert json.loads(body)["error"]["code"] == "not_found"


def test_a_body_trickled_a_byte_at_a_time_is_cut_off(client):
    result = run_client(client, "trickle", "/v1/chat/completions")
    # client_body_timeout 5s between two reads: the gateway closes, it does not wait for ever.
    assert result["closed_after_s"] < 30, result


def test_config_loads_without_warnings_and_keeps_prompts_off_the_disk(host):
    checked = host.run("nginx -t")
    assert "exceed open file resource limit" not in checked.stderr
    assert "ssl_stapling" not in checked.stderr
    config = host.check_output("nginx -T 2>/dev/null")
    assert "client_body_temp_path /run/nginx-client-body" in config
    assert "proxy_max_temp_file_size 0" in config
    assert "ssl_stapling on" not in config
    assert host.check_output("findmnt -n -o FSTYPE -T /run") == "tmpfs"
