"""Verify Redis as an inference node sees it: TLS only, verified against the internal CA, ACL users
only, and the app's own quota scripts working under the app's user."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import pytest
import redis
import redis.asyncio

from app.auth import KeyLimits, Principal
from app.quota import LocalQuota, QuotaExceededError
from app.quota.shared import SharedQuota

CA = Path(os.environ["PLI_CA_DIR"]) / "ca.pem"
APP = ("pli-app", "molecule-app-password-0123456789")
READER = ("pli-reader", "molecule-reader-password-0123456789")


@pytest.fixture(scope="module")
def address(host) -> str:
    facts = host.ansible("setup", "filter=ansible_default_ipv4")["ansible_facts"]
    return facts["ansible_default_ipv4"]["address"]


def client(address: str, user: tuple[str, str] | None = APP, **options) -> redis.Redis:
    username, password = user if user else (None, None)
    settings = {"ssl": True, "ssl_ca_certs": str(CA), "socket_timeout": 5, "socket_connect_timeout": 5}
    settings.update(options)
    return redis.Redis(host=address, port=6379, username=username, password=password, **settings)


def test_the_app_user_connects_with_a_verified_certificate(address):
    assert client(address).ping()


def test_the_app_url_form_works_as_the_app_reads_it(address):
    url = f"rediss://{APP[0]}:{APP[1]}@{address}:6379/0?ssl_ca_certs={CA}"
    assert redis.Redis.from_url(url).ping()


def test_the_apps_quota_scripts_run_under_its_user(address):
    async def scenario() -> list[bool]:
        url = f"rediss://{APP[0]}:{APP[1]}@{address}:6379/0?ssl_ca_certs={CA}"
        node = SharedQuota(redis.asyncio.Redis.from_url(url), LocalQuota())
        caller = Principal(key_id="molecule-key", tenant="t", name="n", via="api_key", limits=KeyLimits(rpm=3))
        results = []
        for _ in range(5):
            try:
                await node.reserve(caller, 1)
                results.append(True)
            except QuotaExceededError:
                results.append(False)
        assert node.shared, "fell back to node-local counting: the scripts did not run on Redis"
        await node.aclose()
        return results

    assert asyncio.run(scenario()) == [True, True, True, False, False]


def test_there_is_no_default_user(address):
    with pytest.raises(redis.AuthenticationError):
        client(address, user=None).ping()
    with pytest.raises(redis.AuthenticationError):
        client(address, user=("default", "")).ping()


def test_a_wrong_password_is_refused(address):
    with pytest.raises(redis.AuthenticationError):
        client(address, user=(APP[0], "not-the-password-0123456789")).ping()


def test_a_server_not_signed_by_the_ca_is_refused(address):
    # The system bundle holds public CAs only: the internal certificate must not verify against it.
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        client(address, ssl_ca_certs=ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt").ping()


def test_there_is_no_plaintext_port(address):
    with pytest.raises(redis.ConnectionError):
        client(address, ssl=False).ping()


def test_users_are_confined_to_their_keys_and_commands(address):
    app = client(address)
    with pytest.raises(redis.exceptions.NoPermissionError):
        app.set("outside:key", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        app.flushall()
    with pytest.raises(redis.exceptions.NoPermissionError):
        app.config_get("*")
    app.set("pli:molecule", "1")
    reader = client(address, user=READER)
    assert reader.get("pli:molecule") == b"1"
    with pytest.raises(redis.exceptions.NoPermissionError):
        reader.set("pli:molecule", "2")


def test_the_exporters_user_reads_statistics_and_no_key(host, address):
    secret = host.file("/etc/redis/monitoring.secret")
    assert (secret.user, secret.mode) == ("root", 0o600)
    exporter = client(address, user=("pli-monitoring", secret.content_string.strip()))
    assert exporter.ping()
    assert "used_memory" in exporter.info("memory")
    exporter.slowlog_get(1)
    client(address).set("pli:molecule-secret", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        exporter.get("pli:molecule-secret")
    with pytest.raises(redis.exceptions.NoPermissionError):
        exporter.config_get("*")
    with pytest.raises(redis.exceptions.NoPermissionError):
        exporter.keys("*")


def test_passwords_are_stored_as_hashes_only(host):
    acl = host.file("/etc/redis/users.acl")
    assert (acl.user, acl.group, acl.mode) == ("root", "redis", 0o640)
    assert APP[1] not in acl.content_string
    assert "user default off" in acl.content_string


def test_the_key_is_the_redis_users_alone(host):
    key = host.file("/etc/redis/tls/server.key")
    assert (key.user, key.mode) == ("redis", 0o600)
    assert host.file("/etc/redis/admin.secret").mode == 0o600


def test_listening_on_the_private_address_and_loopback_only(host, address):
    listening = host.check_output("ss -Htln 'sport = :6379'")
    addresses = sorted(line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines())
    assert addresses == sorted(["127.0.0.1", address])


def test_nothing_is_written_to_disk(host):
    admin = "REDISCLI_AUTH=$(cat /etc/redis/admin.secret) redis-cli -s /run/redis/redis-server.sock --user pli-admin"
    # No snapshot rules (an empty value) and no append-only file.
    assert host.run(f"{admin} --no-auth-warning CONFIG GET save").stdout.split("\n")[:2] == ["save", ""]
    assert host.check_output(f"{admin} --no-auth-warning CONFIG GET appendonly").splitlines() == ["appendonly", "no"]


def test_redis_runs_enabled(host):
    service = host.service("redis-server")
    assert service.is_running and service.is_enabled
