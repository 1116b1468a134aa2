"""A real PostgreSQL server for the tests: the distribution's `postgresql` package, `initdb` in a
temporary folder, run as an unprivileged user (PostgreSQL refuses to run as root), listening on
127.0.0.1 on a free port and on a unix socket in that folder. Authentication is `trust` for the
test user on loopback only — the server lives as long as the test session and holds test data.

    with PgServer(tmp_path) as pg:
        psycopg.connect(pg.dsn)

`pg_problem()` says why no server can run here (no initdb, no psycopg), or None.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from tests.sshd_hosts import DEFAULT_LOGIN_USER, ensure_login_user
from tests.support import free_port

START_DEADLINE_S = 30.0


def find_pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def pg_problem() -> str | None:
    if find_pg_bin("initdb") is None or find_pg_bin("pg_ctl") is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    return None



class PgServer:
    def __init__(self, base: Path, database: str = "quantlab"):
        self.base = Path(base)
        self.data = self.base / "data"
        self.sockets = self.base / "sockets"
        self.database = database
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        self.user = DEFAULT_LOGIN_USER if self.as_root else pwd.getpwuid(os.getuid()).pw_name
        self.log = self.base / "server.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}?connect_timeout=5"

    def _run(self, argv: list[str], timeout: float = START_DEADLINE_S) -> subprocess.CompletedProcess:
        if self.as_root:
            argv = ["runuser", "-u", self.user, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self) -> "PgServer":
        self.base.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self.as_root:
            pw = ensure_login_user()
            for path in (self.base, self.sockets):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            # Every folder above must be searchable by that user (pytest's tmp folders are 0700).
            for parent in list(self.base.parents)[:-1]:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
        done = self._run([find_pg_bin("initdb"), "-D", str(self.data), "-U", self.user, "-A", "trust",
                          "--no-sync", "-E", "UTF8", "--locale=C"])
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()[-500:]}")
        self.resume()
        self._create_database()
        return self

    def resume(self) -> None:
        """Start the server (again, after `stop`) on the same folder and port."""
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off "
                   "-c max_connections=80")
        done = self._run([find_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                          "-w", "-t", str(int(START_DEADLINE_S)), "start"])
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()[-300:]}; log: {self.log_tail()}")

    def _create_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            try:
                with psycopg.connect(f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres?connect_timeout=5",
                                     autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{self.database}"')
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-800:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.data.exists():
            self._run([find_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def __enter__(self) -> "PgServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
