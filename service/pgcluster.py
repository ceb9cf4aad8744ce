"""Embedded PostgreSQL for `make run` and the tests: find (or apt-install) the server
binaries, then create, start, reuse and stop a private cluster in a data directory.

The cluster listens on a Unix socket only (`listen_addresses = ''`), in a directory
under /tmp named after a hash of the data directory. Chosen over TCP on a free port:
no port can be taken by another process between choosing and binding, two clusters
never collide, nothing listens on the network, and the path stays well inside the
~107-byte socket limit however deep the project is cloned. The directory is 0700, so
only its owner (and root) can reach the trust-authenticated socket.

initdb and postgres refuse to run as root: as root they run as the data directory's
owner, else `postgres`, else a `govledger` system user created for the purpose.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import structlog

log = structlog.get_logger()

DATABASE = "govledger"
SUPERUSER = "postgres"
PORT = 5432
FAST_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}

_REQUIRED = ("initdb", "pg_ctl", "postgres", "psql")
_INITDB_OPTIONS = (
    f"--username={SUPERUSER}",
    "--auth-local=trust",  # reachable only through the 0700 socket directory
    "--auth-host=reject",  # and nothing listens on TCP anyway
    "--encoding=UTF8",
    "--locale=C",  # needs no installed locale; byte-order collation
)
_CONF = "govledger.conf"  # rewritten at every start; postgresql.conf includes it
_LOG = "server.log"
_NAME = re.compile(r"[a-z_][a-z0-9_.]*\Z")
_TIMEOUT = 120  # seconds for any one initdb/pg_ctl/psql run; pg_ctl -w gives up at 60


class ClusterError(RuntimeError):
    """The embedded cluster could not be found, installed, created, started, stopped."""


@dataclass(frozen=True)
class _Account:
    """The unprivileged user that runs initdb, pg_ctl and postgres when we are root."""

    uid: int
    gid: int


def ensure_started(
    data_dir: Path,
    *,
    settings: Mapping[str, str] | None = None,
    database: str = DATABASE,
) -> str:
    """Create the cluster in data_dir on first use, start it unless it already runs,
    create `database` if missing, and return an asyncpg DSN for it.

    `settings` (postgresql.conf names and values) apply when this call starts the
    server; a server that already runs is reused as it is.
    """
    return _ensure_started(data_dir, dict(settings or {}), database, fast=False)


def stop(data_dir: Path) -> None:
    """Stop the cluster in data_dir (`pg_ctl -m fast`); nothing to do when stopped."""
    data_dir = data_dir.resolve()
    if not (data_dir / "PG_VERSION").is_file():
        return
    bindir = find_binaries(install=False)
    with _locked(data_dir):
        account = _account(data_dir)
        if _is_running(bindir, data_dir, account):
            done = _pg_ctl(
                bindir, data_dir, "-m", "fast", "-w", "stop", account=account
            )
            if done.returncode != 0:
                raise ClusterError(f"pg_ctl stop failed in {data_dir}: {_output(done)}")
            log.info("cluster_stopped", data_dir=str(data_dir))
    with contextlib.suppress(OSError):  # still in use if something else runs there
        socket_dir(data_dir).rmdir()


def status(data_dir: Path, *, database: str = DATABASE) -> str | None:
    """The DSN of the running cluster in data_dir, or None when it is not running."""
    data_dir = data_dir.resolve()
    if not (data_dir / "PG_VERSION").is_file():
        return None
    bindir = find_binaries(install=False)
    if not _is_running(bindir, data_dir, _account(data_dir)):
        return None
    return _dsn(*_address(data_dir), database)


@contextlib.contextmanager
def throwaway(*, settings: Mapping[str, str] | None = None) -> Iterator[str]:
    """A cluster in a new temporary directory, tuned for speed over durability
    (FAST_SETTINGS, overridable by `settings`); yields the DSN of `govledger` and
    stops and removes everything on exit."""
    data_dir = Path(tempfile.mkdtemp(prefix="govledger-test-"))
    try:
        merged = {**FAST_SETTINGS, **(settings or {})}
        yield _ensure_started(data_dir, merged, DATABASE, fast=True)
    finally:
        try:
            stop(data_dir)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


def socket_dir(data_dir: Path) -> Path:
    """The short, per-cluster directory under /tmp that holds the server's socket."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return Path("/tmp") / f"govledger-sock-{digest}"


@functools.cache
def find_binaries(*, install: bool = True) -> Path:
    """The directory holding initdb, pg_ctl, postgres and psql: the one of `pg_ctl` on
    PATH, else the newest /usr/lib/postgresql/*/bin; installed with apt-get (as root)
    when neither exists and `install` is true."""
    found = _search_binaries()
    if found is None and install and os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install_postgresql()
        found = _search_binaries()
    if found is None:
        raise ClusterError(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres, psql) were not"
            " found: install PostgreSQL 13 or later (e.g. `apt-get install"
            " postgresql`) or put its bin directory on PATH."
        )
    return found


def _ensure_started(
    data_dir: Path, settings: dict[str, str], database: str, *, fast: bool
) -> str:
    for name in [database, *settings]:
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a plain lowercase PostgreSQL name")
    data_dir = data_dir.resolve()
    bindir = find_binaries()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(data_dir):
        account = _account(data_dir)
        if not (data_dir / "PG_VERSION").is_file():
            _initdb(bindir, data_dir, account, fast=fast)
        if not _is_running(bindir, data_dir, account):
            _start(bindir, data_dir, account, settings)
        host, port = _address(data_dir)
        _create_database(bindir, host, port, database)
    return _dsn(host, port, database)


def _initdb(
    bindir: Path, data_dir: Path, account: _Account | None, *, fast: bool
) -> None:
    if account is not None:
        os.chown(data_dir, account.uid, account.gid)
    args: list[str | Path] = [bindir / "initdb", f"--pgdata={data_dir}"]
    args += _INITDB_OPTIONS
    if fast:
        args.append("--no-sync")
    result = _run(args, account=account, check=False)
    if result.returncode != 0:
        hint = ""
        if account is not None:
            owner = pwd.getpwuid(account.uid).pw_name
            hint = f" (as root, initdb runs as {owner}, who must be able to reach it)"
        raise ClusterError(f"initdb failed for {data_dir}{hint}: {_output(result)}")
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write(f"\ninclude_if_exists = '{_CONF}'\n")
    log.info("cluster_initialized", data_dir=str(data_dir))


def _start(
    bindir: Path, data_dir: Path, account: _Account | None, settings: dict[str, str]
) -> None:
    sockets = socket_dir(data_dir)
    _prepare_socket_dir(sockets, account)
    values = {
        "listen_addresses": "",
        "unix_socket_directories": str(sockets),
        "port": str(PORT),
        **settings,
    }
    conf = data_dir / _CONF
    conf.write_text("".join(f"{k} = {_quote(v)}\n" for k, v in values.items()))
    if account is not None:
        os.chown(conf, account.uid, account.gid)
    logfile = data_dir / _LOG
    result = _pg_ctl(bindir, data_dir, "-l", logfile, "-w", "start", account=account)
    if result.returncode != 0:
        with contextlib.suppress(OSError):
            sockets.rmdir()
        raise ClusterError(
            f"PostgreSQL did not start in {data_dir}: {_output(result)}\n"
            f"last lines of {logfile}:\n{_tail(logfile)}"
        )
    log.info("cluster_started", data_dir=str(data_dir), socket_dir=str(sockets))


def _prepare_socket_dir(path: Path, account: _Account | None) -> None:
    # The name is predictable and /tmp is shared: accept only a real directory that
    # belongs to us (or, as root, to the server's account), never a symlink.
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    owners = {os.geteuid()} if account is None else {0, account.uid}
    if path.is_symlink() or not path.is_dir() or info.st_uid not in owners:
        raise ClusterError(f"{path} exists and is not a directory of this user")
    if account is not None:
        os.chown(path, account.uid, account.gid, follow_symlinks=False)
    path.chmod(0o700)


def _create_database(bindir: Path, host: str, port: int, database: str) -> None:
    psql: list[str | Path] = [bindir / "psql", "-XqAt", "--set=ON_ERROR_STOP=1"]
    psql += ["-h", host, "-p", str(port), "-U", SUPERUSER, "-d", "postgres", "-c"]
    found = _run([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{database}'"])
    if found.stdout.strip() != "1":
        _run([*psql, f'CREATE DATABASE "{database}"'])


def _is_running(bindir: Path, data_dir: Path, account: _Account | None) -> bool:
    # pg_ctl status: 0 running, 3 not running, 4 no readable data directory.
    return _pg_ctl(bindir, data_dir, "status", account=account).returncode == 0


def _pg_ctl(
    bindir: Path, data_dir: Path, *args: str | Path, account: _Account | None
) -> subprocess.CompletedProcess[str]:
    """pg_ctl's answer; the caller judges the exit code."""
    return _run(
        [bindir / "pg_ctl", "-D", data_dir, *args], account=account, check=False
    )


def _address(data_dir: Path) -> tuple[str, int]:
    """Socket directory and port of the running server, from postmaster.pid."""
    lines = (data_dir / "postmaster.pid").read_text().splitlines()
    if len(lines) < 5 or not lines[4]:
        raise ClusterError(f"the server in {data_dir} does not listen on a Unix socket")
    return lines[4], int(lines[3])


def _dsn(host: str, port: int, database: str) -> str:
    return f"postgresql://{SUPERUSER}@/{database}?host={quote(host)}&port={port}"


def _account(data_dir: Path) -> _Account | None:
    if os.geteuid() != 0:
        return None
    if (data_dir / "PG_VERSION").is_file():
        info = data_dir.stat()
        if info.st_uid != 0:
            return _Account(info.st_uid, info.st_gid)
    return _service_account()


@functools.cache
def _service_account() -> _Account:
    for name in ("postgres", "govledger"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _Account(entry.pw_uid, entry.pw_gid)
    if shutil.which("useradd") is None:
        raise ClusterError(
            "PostgreSQL cannot run as root and there is no `postgres` user: create"
            " one, or run as an unprivileged user."
        )
    _run(["useradd", "--system", "--user-group", "--no-create-home", "govledger"])
    entry = pwd.getpwnam("govledger")
    return _Account(entry.pw_uid, entry.pw_gid)


def _search_binaries() -> Path | None:
    candidates: list[Path] = []
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).resolve().parent)
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda bindir: [
            int(p) for p in bindir.parent.name.split(".") if p.isdigit()
        ],
        reverse=True,
    )
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in _REQUIRED):
            return bindir
    return None


def _apt_install_postgresql() -> None:
    log.warning("postgresql_installing", command="apt-get install -y postgresql")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        # stdout=2: apt's progress goes to stderr; the CLI's stdout is the DSN.
        done = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, stdout=2)
        if done.returncode != 0:
            raise ClusterError(
                f"`{' '.join(args)}` failed: install PostgreSQL 13 or later yourself"
            )


def _run(
    args: Sequence[str | Path], *, account: _Account | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    # PG* variables (PGPORT, PGOPTIONS, ...) would change what the tools connect to.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    try:
        result = subprocess.run(
            [str(arg) for arg in args],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",  # the caller's directory may be closed to the server's account
            timeout=_TIMEOUT,
            user=None if account is None else account.uid,
            group=None if account is None else account.gid,
            extra_groups=None if account is None else [],
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"{args[0]} did not finish in {_TIMEOUT} s") from exc
    if check and result.returncode != 0:
        name = Path(args[0]).name
        raise ClusterError(
            f"{name} failed (exit {result.returncode}): {_output(result)}"
        )
    return result


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    # Two processes (make run and a CLI call, say) must not initdb or start together.
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "''")
    return f"'{escaped}'"


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stderr.strip() or result.stdout.strip())[-2000:]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.pgcluster", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="create and start; print the DSN")
    start.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    commands.add_parser("stop", help="stop (pg_ctl -m fast)")
    commands.add_parser("status", help="print the DSN; exit 3 when stopped")
    for command in ("start", "stop", "status"):
        commands.choices[command].add_argument("data_dir", type=Path)
    commands.add_parser("bindir", help="print the binaries' directory; install them")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            pairs = [item.partition("=") for item in args.set]
            if any(not sep for _, sep, _ in pairs):
                parser.error("--set takes NAME=VALUE")
            print(ensure_started(args.data_dir, settings={k: v for k, _, v in pairs}))
        elif args.command == "stop":
            stop(args.data_dir)
        elif args.command == "status":
            dsn = status(args.data_dir)
            print(dsn or "stopped")
            return 0 if dsn else 3
        else:
            print(find_binaries())
    except (ClusterError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    sys.exit(main())
