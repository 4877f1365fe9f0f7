"""Verify PostgreSQL as an inference node sees it: TLS verified against the internal CA, SCRAM, the
owner to its own database only, and the app's own migrations run over it."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from app.store.database import open_database

CA = Path(os.environ["PLI_CA_DIR"]) / "ca.pem"
USER, PASSWORD, DATABASE = "pli_app", "molecule-app-password-0123456789", "private_llm"


@pytest.fixture(scope="module")
def address(host) -> str:
    facts = host.ansible("setup", "filter=ansible_default_ipv4")["ansible_facts"]
    return facts["ansible_default_ipv4"]["address"]


def connect(address: str, **options: str) -> psycopg.Connection:
    settings = {
        "host": address,
        "user": USER,
        "password": PASSWORD,
        "dbname": DATABASE,
        "sslmode": "verify-full",
        "sslrootcert": str(CA),
        "connect_timeout": "5",
    }
    settings.update(options)
    return psycopg.connect(**settings)


def test_the_app_connects_verified_and_runs_its_migrations(address, tmp_path):
    url = f"postgresql://{USER}:{PASSWORD}@{address}:5432/{DATABASE}?sslmode=verify-full&sslrootcert={CA}"
    database = open_database(tmp_path / "unused.db", url)
    with database.engine.connect() as connection:
        assert connection.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).scalar()
        assert connection.execute(text("SELECT count(*) FROM api_keys")).scalar() == 0
    database.engine.dispose()


def test_without_tls_the_connection_is_refused(address):
    with pytest.raises(psycopg.OperationalError, match="no encryption|rejects connection"):
        connect(address, sslmode="disable")


def test_a_wrong_password_is_refused(address):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(address, password="not-the-password-0123456789")


def test_a_server_not_signed_by_the_ca_is_refused(address):
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(address, sslrootcert="/etc/ssl/certs/ca-certificates.crt")


def test_the_owner_reaches_its_own_database_only(address):
    with pytest.raises(psycopg.OperationalError, match="rejects connection|no pg_hba.conf entry"):
        connect(address, dbname="postgres")


def test_a_host_that_is_not_a_client_is_refused(host, address):
    # From the server's own private address, which is not in the client list.
    result = host.run(
        f"PGPASSWORD={PASSWORD} PGCONNECT_TIMEOUT=5 psql 'host={address} user={USER} dbname={DATABASE}"
        " sslmode=require' -c 'SELECT 1'"
    )
    assert result.rc != 0
    assert "rejects connection" in result.stderr or "no pg_hba.conf entry" in result.stderr, result.stderr


def test_the_password_is_stored_as_a_scram_verifier(host):
    stored = host.check_output(
        f"runuser -u postgres -- psql -tAc \"SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'\""
    )
    assert stored.startswith("SCRAM-SHA-256$")


def test_listening_on_the_private_address_and_loopback_only(host, address):
    listening = host.check_output("ss -Htln 'sport = :5432'")
    addresses = sorted(line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines())
    assert addresses == sorted(["127.0.0.1", address])


def test_the_key_is_the_postgres_users_alone(host):
    key = host.file("/etc/postgresql/15/main/tls/server.key")
    assert (key.user, key.mode) == ("postgres", 0o600)


def test_a_refused_configuration_left_the_previous_one_in_place(host):
    settings = host.file("/etc/postgresql/15/main/conf.d/50-private-llm.conf").content_string
    assert "work_mem" not in settings
    assert "log_min_duration_statement = 1000" in settings
    errors = host.check_output(
        "runuser -u postgres -- psql -tAc 'SELECT count(*) FROM pg_file_settings WHERE error IS NOT NULL'"
    )
    assert errors == "0"


def monitoring_query(host, sql: str, database: str = "postgres", via: str = "/run/postgresql"):
    return host.run(f'runuser -u prometheus -- psql -h {via} -d {database} -tAc "{sql}"')


def test_the_exporters_role_reads_every_databases_statistics_on_the_socket(host):
    result = monitoring_query(host, "SELECT numbackends >= 0 FROM pg_stat_database WHERE datname = 'private_llm'")
    assert (result.rc, result.stdout.strip()) == (0, "t"), result.stderr
    # pg_monitor: the other sessions' activity too, not only its own.
    result = monitoring_query(
        host, "SELECT pg_has_role('pg_monitor', 'member'), rolsuper FROM pg_roles WHERE rolname = current_user"
    )
    assert (result.rc, result.stdout.strip()) == (0, "t|f"), result.stderr


def test_the_exporters_role_reaches_nothing_else(host, address):
    no_data = monitoring_query(host, "SELECT 1", database="private_llm")
    # The rule that rejects everything not let in above.
    assert no_data.rc != 0 and "pg_hba.conf rejects connection" in no_data.stderr, no_data.stderr
    no_network = monitoring_query(host, "SELECT 1", via="127.0.0.1")
    assert no_network.rc != 0, no_network.stdout
    stored = host.check_output(
        "runuser -u postgres -- psql -tAc \"SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = 'prometheus'\""
    )
    assert stored == "t"


def test_postgresql_runs_enabled(host):
    service = host.service("postgresql@15-main")
    assert service.is_running and service.is_enabled
