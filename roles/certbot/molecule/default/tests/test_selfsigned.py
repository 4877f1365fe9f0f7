"""Verify certbot's selfsigned mode: the certificate nginx serves carries the site's names."""

from __future__ import annotations

CERT = "/etc/ssl/private-llm-infra/api.pli.test/fullchain.pem"
KEY = "/etc/ssl/private-llm-infra/api.pli.test/privkey.pem"


def served(host, name: str) -> str:
    return host.check_output(
        f"openssl s_client -connect 127.0.0.1:443 -servername {name} -CAfile {CERT} -verify_hostname {name}"
        " -verify_return_error </dev/null 2>&1"
    )


def test_certificate_names_every_site_name(host):
    text = host.check_output(f"openssl x509 -in {CERT} -noout -text")
    assert "DNS:api.pli.test" in text
    assert "DNS:chat.pli.test" in text
    assert "Subject: CN = api.pli.test" in text
    assert "TLS Web Server Authentication" in text


def test_certificate_is_ecdsa_p256_and_self_signed(host):
    text = host.check_output(f"openssl x509 -in {CERT} -noout -text")
    assert "prime256v1" in text
    assert "Issuer: CN = api.pli.test" in text
    assert host.run(f"openssl verify -CAfile {CERT} {CERT}").rc == 0


def test_key_is_private(host):
    key = host.file(KEY)
    assert key.mode == 0o600
    assert key.user == "root"


def test_nginx_serves_it_and_it_verifies_for_each_name(host):
    for name in ("api.pli.test", "chat.pli.test"):
        output = served(host, name)
        assert "Verify return code: 0 (ok)" in output, output


def test_validity_follows_the_setting(host):
    # certbot_selfsigned_days: 90 -> it expires within 91 days and not within 89.
    assert host.run(f"openssl x509 -in {CERT} -noout -checkend {91 * 86400}").rc == 1
    assert host.run(f"openssl x509 -in {CERT} -noout -checkend {89 * 86400}").rc == 0


def test_no_acme_client_in_selfsigned_mode(host):
    assert not host.package("certbot").is_installed


def test_nginx_serves_the_certificate_on_disk(host):
    """After side_effect's renewal: the new certificate, not the one nginx loaded before (reloaded)."""
    on_disk = host.check_output(f"openssl x509 -in {CERT} -noout -serial")
    served_now = host.check_output(
        "openssl s_client -connect 127.0.0.1:443 -servername api.pli.test </dev/null 2>/dev/null"
        " | openssl x509 -noout -serial"
    )
    assert served_now == on_disk
