"""Verify the internal CA: a CA on the controller only, and a server certificate chained to it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

PKI = "/etc/private-llm/pki"
CA_DIR = Path(os.environ["PLI_CA_DIR"])


def text(host, path: str) -> str:
    return host.check_output(f"openssl x509 -in {path} -noout -text")


def test_the_ca_key_stays_on_the_controller_encrypted(host):
    key = CA_DIR / "ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(CA_DIR.stat().st_mode) == 0o700
    assert "ENCRYPTED" in key.read_text()
    assert host.run(f"ls {PKI}").stdout.split() == ["ca.pem", "server.key", "server.pem"]


def test_the_host_trusts_the_controller_ca(host):
    assert host.file(f"{PKI}/ca.pem").content_string == (CA_DIR / "ca.pem").read_text()
    ca = text(host, f"{PKI}/ca.pem")
    assert "CA:TRUE, pathlen:0" in ca
    assert "Certificate Sign, CRL Sign" in ca


def test_the_server_certificate_chains_and_names_the_host(host):
    assert host.run(f"openssl verify -CAfile {PKI}/ca.pem {PKI}/server.pem").rc == 0
    server = text(host, f"{PKI}/server.pem")
    address = host.ansible("setup", "filter=ansible_default_ipv4")["ansible_facts"]["ansible_default_ipv4"]["address"]
    for name in ("DNS:state.pli.test", "DNS:localhost", "IP Address:127.0.0.1", f"IP Address:{address}"):
        assert name in server
    assert "CA:FALSE" in server
    assert "TLS Web Server Authentication" in server


def test_the_server_key_is_private_and_matches(host):
    key = host.file(f"{PKI}/server.key")
    assert (key.user, key.group, key.mode) == ("root", "root", 0o600)
    from_key = host.check_output(f"openssl pkey -in {PKI}/server.key -pubout")
    from_certificate = host.check_output(f"openssl x509 -in {PKI}/server.pem -noout -pubkey")
    assert from_key == from_certificate


@pytest.mark.parametrize("check", ["-verify_hostname localhost", "-verify_hostname state.pli.test", "-verify_ip 127.0.0.1"])
def test_a_client_checking_chain_and_name_accepts_it(host, check):
    assert host.run(f"openssl verify -CAfile {PKI}/ca.pem {check} {PKI}/server.pem").rc == 0


def test_a_name_not_on_the_certificate_is_refused(host):
    server = host.file(f"{PKI}/server.pem").content_string
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(CA_DIR / "ca.pem"), "-verify_hostname", "db.elsewhere.test"],
        input=server,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode != 0
