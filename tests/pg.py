"""A real PostgreSQL server for tests (Debian's postgresql package), started in a temporary directory.

Skips with a clear reason where the server binaries are missing or the server cannot start.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class PostgresServer:
    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cascade-pg-"))
        self.data = self.dir / "data"
        self.user = None
        if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres user
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run the server as")
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.user is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def start(self) -> "PostgresServer":
        r = self._run(self.initdb, "-D", str(self.data), "-U", "cascade", "--auth=trust", "-E", "UTF8")
        if r.returncode != 0:
            pytest.skip(f"initdb failed: {r.stderr.strip()[:300]}")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        r = self._run(self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        if r.returncode != 0:
            pytest.skip(f"PostgreSQL did not start: {r.stderr.strip()[:300]}")
        deadline = time.monotonic() + 30
        import psycopg

        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        return self

    @property
    def url(self) -> str:
        return f"postgresql://cascade@127.0.0.1:{self.port}/postgres"

    def reset(self) -> None:
        """An empty schema. A ledger a previous test left behind on a server it froze (by design: its close does
        not wait for a hung database) may finish its write as the server resumes, while this drops its tables:
        PostgreSQL then ends one of the two as a deadlock, and when that is the drop, it is tried again."""
        import psycopg

        for attempt in range(5):
            try:
                with psycopg.connect(self.url, autocommit=True) as c:
                    c.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
                return
            except psycopg.errors.DeadlockDetected:
                if attempt == 4:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' for the PostgreSQL ledger tests")
    server = PostgresServer().start()
    yield server
    server.stop()
