"""A throwaway PostgreSQL for the tests: Debian's server binaries on a cluster of their own (127.0.0.1, a
free port, scram-sha-256), removed afterwards. initdb refuses root, so as root the cluster is postgres's."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg


def _binaries() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    assert found, "PostgreSQL server binaries are missing: `make setup` installs Debian's postgresql"
    return found[-1].parent


def _as_owner(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@dataclass
class PostgresServer:
    folder: Path
    port: int
    password: str

    def url(self, database: str) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')  # a test's own name, never input
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            _as_owner([str(_binaries() / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres() -> PostgresServer:
    # Not under pytest's tmp_path: its parents are root's 0700 folders the postgres user cannot enter.
    folder = Path(tempfile.mkdtemp(prefix="pli-test-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    password = secrets.token_hex(16)
    password_file = folder / "password"
    password_file.write_text(password)
    if os.geteuid() == 0:
        os.chown(password_file, owner.pw_uid, owner.pw_gid)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bin_dir = _binaries()
    subprocess.run(
        _as_owner(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(folder / "data"),
                "-A",
                "scram-sha-256",
                "-U",
                "postgres",
                f"--pwfile={password_file}",
                "--no-sync",
            ]
        ),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_owner(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(folder / "data"),
                "-o",
                options,
                "-l",
                str(folder / "log"),
                "-w",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    return PostgresServer(folder, port, password)
