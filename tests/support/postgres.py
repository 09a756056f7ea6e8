"""Throwaway PostgreSQL server for tests, built from this machine's binaries.

``running_postgres(base_dir)`` runs ``initdb`` + ``pg_ctl start`` on a free
127.0.0.1 port, creates the database ``meterline`` and yields a SQLAlchemy URL
``postgresql+psycopg://meterline@127.0.0.1:PORT/meterline`` (trust auth, no
password).  On exit the server is stopped (``pg_ctl stop -m fast``, falling
back to ``-m immediate``; both bounded) and its files are removed.

PostgreSQL refuses to run as root.  When ``os.geteuid() == 0`` the binaries run
as the ``postgres`` system user via ``runuser``; because pytest's tmp dirs
(/tmp/pytest-of-root/...) are mode 700 and not traversable by that user, the
server files then live in a fresh ``tempfile.mkdtemp(prefix="meterline-pg-")``
dir (mode 0o755, owned by ``postgres``) instead of ``base_dir``.  Otherwise
they live under ``base_dir`` and run as the current user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

from tests.support.processes import free_port

DB_NAME = "meterline"
DB_USER = "meterline"
_PG_SYSTEM_USER = "postgres"
_SERVER_OPTS = (
    "-F -c listen_addresses=127.0.0.1 -c fsync=off"
    " -c synchronous_commit=off -c full_page_writes=off"
)


def pg_bin(name: str) -> str | None:
    """Return the path of PostgreSQL binary ``name`` (PATH first), or None."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None  # newest major version last


def postgres_available() -> bool:
    """True if ``initdb`` and ``pg_ctl`` can be found."""
    return pg_bin("initdb") is not None and pg_bin("pg_ctl") is not None


def _as_root() -> bool:
    return os.geteuid() == 0


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool, as the ``postgres`` user when we are root."""
    prefix = ["runuser", "-u", _PG_SYSTEM_USER, "--"] if _as_root() else []
    return subprocess.run(
        prefix + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no server log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _binary(name: str) -> str:
    path = pg_bin(name)
    if path is None:
        raise RuntimeError(f"PostgreSQL binary {name!r} not found")
    return path


@contextlib.contextmanager
def running_postgres(base_dir: Path) -> Iterator[str]:
    """Start a throwaway server, yield a URL for a fresh ``meterline`` DB, stop it."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if _as_root():
        work = Path(tempfile.mkdtemp(prefix="meterline-pg-"))
        work.chmod(0o755)
    else:
        work = Path(tempfile.mkdtemp(prefix="pg-", dir=base_dir))
    data, sockets = work / "data", work / "sock"
    data.mkdir(mode=0o700)
    sockets.mkdir(mode=0o700)
    if _as_root():
        pw = pwd.getpwnam(_PG_SYSTEM_USER)
        for path in (work, data, sockets):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    log = data / "server.log"
    started = False
    try:
        init = _run(
            [initdb, "-D", str(data), "-A", "trust", "-U", DB_USER, "--no-sync",
             "-E", "UTF8", "--locale=C"],
            cwd=work, timeout=120,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        port = free_port()
        opts = f"{_SERVER_OPTS} -p {port} -k {sockets}"
        start = _run(
            [pg_ctl, "-w", "-t", "30", "-D", str(data), "-l", str(log), "-o", opts, "start"],
            cwd=work, timeout=60,
        )
        started = True  # even a failed start may leave a postmaster behind
        if start.returncode != 0:
            raise RuntimeError(
                f"pg_ctl start failed ({start.returncode}): {start.stderr.strip()}\n"
                f"--- tail of {log} ---\n{_tail(log)}"
            )
        admin = f"host=127.0.0.1 port={port} user={DB_USER} dbname=postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB_NAME)))
        yield f"postgresql+psycopg://{DB_USER}@127.0.0.1:{port}/{DB_NAME}"
    finally:
        if started:
            _stop(pg_ctl, data, work)
        shutil.rmtree(work, ignore_errors=True)


def _stop(pg_ctl: str, data: Path, work: Path) -> None:
    """Stop the server: fast shutdown, then immediate if that does not finish."""
    for mode in ("fast", "immediate"):
        try:
            _run([pg_ctl, "stop", "-D", str(data), "-m", mode, "-w", "-t", "20"],
                 cwd=work, timeout=30)
        except subprocess.TimeoutExpired:
            continue
        if not (data / "postmaster.pid").exists():
            return
    raise RuntimeError(f"could not stop PostgreSQL server in {data}")


def empty_all_tables(engine) -> None:
    """Empty every meterline table of a shared test database (a fresh start per test)."""
    from sqlalchemy import text
    from sqlmodel import SQLModel

    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(SQLModel.metadata.tables)} CASCADE"))
