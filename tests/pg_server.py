"""A real, throw-away PostgreSQL server on a free loopback port, in a temp dir, for tests.

The Debian package (`postgresql`) puts its binaries under /usr/lib/postgresql/<version>/bin;
`.ci/run` (through scripts/install.sh) installs it when missing. PostgreSQL refuses to run as
root, so as root the cluster is made and run as the package's `postgres` user. Where none can
be started, `make test` fails and a run by hand skips (tests/local_servers.py).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

from tests.local_servers import free_port, missing_tool


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return versions[-1] if versions else None


class PgServer:
    def __init__(self) -> None:
        initdb, self.postgres = _bin("initdb"), _bin("postgres")
        if initdb is None or self.postgres is None:
            missing_tool("PostgreSQL is not installed (apt-get install -y postgresql; scripts/install.sh does it as root)")
        self.user = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                missing_tool("running as root and there is no 'postgres' user to run PostgreSQL as")
        self.dir = tempfile.mkdtemp(prefix="pg-test-")
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        done = subprocess.run([initdb, "-D", f"{self.dir}/data", "-U", "test", "--auth=trust", "-E", "UTF8", "--no-sync"],
                              capture_output=True, text=True, preexec_fn=self._demote)
        if done.returncode != 0:
            missing_tool(f"initdb failed: {done.stderr.strip()[-300:]}")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://test@127.0.0.1:{self.port}/postgres"

    def _demote(self) -> None:
        if self.user is not None:
            os.setgid(self.user.pw_gid)
            os.setuid(self.user.pw_uid)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.postgres, "-D", f"{self.dir}/data", "-p", str(self.port), "-h", "127.0.0.1", "-k", self.dir,
             "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=self._demote,
        )
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                import psycopg

                psycopg.connect(self.url, connect_timeout=1).close()
                return
            except Exception:  # noqa: BLE001 - not accepting connections yet
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"PostgreSQL did not accept connections on port {self.port} within 20 s")

    def reset(self) -> None:
        """Drop every table and every app's batch schema: each test starts on an empty database."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as c:
            for (name,) in c.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'batches_%'").fetchall():
                c.execute(f'DROP SCHEMA "{name}" CASCADE')
            c.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: SIGTERM would wait for every client to leave
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
