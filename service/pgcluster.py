"""Embedded PostgreSQL for `make run` and the tests: find the server binaries, then
create, start, reuse and stop a private cluster in a data directory.

The library only looks for the binaries (the directory of `pg_ctl` on PATH, then
/usr/lib/postgresql/*/bin, newest first); it never installs anything, so neither does
`govledger serve`. Installing is an explicit step for the Makefile and CI:
`python -m service.pgcluster install` runs `apt-get install postgresql` (as root)
when no binaries are found, and prints their directory.

The cluster listens on a Unix socket only (`listen_addresses = ''`), in a directory
under /tmp named after a hash of the data directory. Chosen over TCP on a free port:
no port can be taken by another process between choosing and binding, two clusters
never collide, nothing listens on the network, and the path stays well inside the
~107-byte socket limit however deep the project is cloned. The directory is 0700, so
only its owner (and root) can reach the trust-authenticated socket.

initdb and postgres refuse to run as root: as root they run as the data directory's
owner, else `postgres`, else a `govledger` system user created for the purpose. That
account must reach the data directory, which a clone in /root or in a `mktemp -d`
folder (both 0700) does not let it do. Such a data directory is relocated to
/var/lib/govledger/<first 16 hex digits of the SHA-256 of the requested directory's
resolved path>: a pure function of the path, so every later start, `stop`, `status`
and `remove` of that path finds the same cluster, and a place that keeps its data
like any system service's (/var/lib survives reboots; /tmp may be a tmpfs or swept
by tmpfiles.d). Each start there logs one line, `data_dir_relocated`, with both
paths; the file `govledger.requested` in the cluster names the path it stands for.
Moving the clone changes the path, hence the place: the old cluster stays behind.
Reachability is tested as the server would meet it: `test -x` on the deepest existing
directory above the data directory, run with the account's uid and gid (access(2)
needs search permission on every directory on the way). A cluster that already
exists, at the requested path or at its relocated place, is used where it is.

Every failure raises ClusterError: its message is one sentence that says what failed
and what to do, fit to print without a traceback; the tools' output is in `detail`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
# Where, as root, a data directory out of the server account's reach is kept instead.
RELOCATION_ROOT = Path("/var/lib/govledger")

NOT_FOUND = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: install them, e.g."
    " `apt-get install postgresql`, or set DATABASE_URL."
)
_SERVER = "set DATABASE_URL to use an existing PostgreSQL server"
_ELSEWHERE = f"point GOVLEDGER_DATA_DIR elsewhere, or {_SERVER}"
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
_REQUESTED = "govledger.requested"  # in a relocated cluster: the path asked for
_NAME = re.compile(r"[a-z_][a-z0-9_.]*\Z")
_TIMEOUT = 120  # seconds for any one initdb/pg_ctl/psql run; pg_ctl -w gives up at 60
_MARKERS = ("PANIC:", "FATAL:", "ERROR:", "error:")  # server log, then tools


class ClusterError(RuntimeError):
    """The embedded cluster could not be found, created, started or stopped.

    `str()` is one sentence, what failed and what to do, to print as it is; `detail`
    holds the tools' output, when there is some, for a log or a curious reader.
    """

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class _Account:
    """The unprivileged user that runs initdb, pg_ctl and postgres when we are root."""

    uid: int
    gid: int

    @property
    def name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"


def ensure_started(
    data_dir: Path,
    *,
    settings: Mapping[str, str] | None = None,
    database: str = DATABASE,
) -> str:
    """Create the cluster asked for at data_dir on first use (at data_location()),
    start it unless it already runs, create `database` if missing, and return an
    asyncpg DSN for it.

    `settings` (postgresql.conf names and values) apply when this call starts the
    server; a server that already runs is reused as it is.
    """
    return _ensure_started(data_dir, dict(settings or {}), database, fast=False)


def stop(data_dir: Path) -> None:
    """Stop the cluster asked for at data_dir (`pg_ctl -m fast`), wherever it lives;
    nothing to do when there is none or it is stopped."""
    found = _existing(data_dir.resolve())
    if found is None:
        return
    bindir = find_binaries()
    with _os_errors(found), _locked(found):
        account = _account(found)
        if _is_running(bindir, found, account):
            done = _pg_ctl(bindir, found, "-m", "fast", "-w", "stop", account=account)
            if done.returncode != 0:
                raise ClusterError(
                    f"pg_ctl stop failed in {found} ({_reason(_output(done))}):"
                    f" see {found / _LOG} and stop the server by hand.",
                    detail=_output(done),
                )
            log.info("cluster_stopped", data_dir=str(found))
    with contextlib.suppress(OSError):  # still in use if something else runs there
        socket_dir(found).rmdir()


def remove(data_dir: Path) -> None:
    """Stop the cluster asked for at data_dir and delete its data directory, wherever
    it lives; only a directory that holds a cluster is ever deleted."""
    found = _existing(data_dir.resolve())
    if found is None:
        return
    stop(found)
    with _os_errors(found):
        shutil.rmtree(found)
    log.info("cluster_removed", data_dir=str(found))


def status(data_dir: Path, *, database: str = DATABASE) -> str | None:
    """The DSN of the cluster asked for at data_dir, or None when it is not running."""
    found = _existing(data_dir.resolve())
    if found is None:
        return None
    bindir = find_binaries()
    if not _is_running(bindir, found, _account(found)):
        return None
    return _dsn(*_address(found), database)


def data_location(data_dir: Path) -> Path:
    """Where the cluster asked for at data_dir is, or would be created: data_dir
    (resolved) itself, or, as root when the server's account cannot reach it, a
    directory under RELOCATION_ROOT named after a hash of its path."""
    requested = data_dir.resolve()
    found = _existing(requested)
    if found is not None:
        return found
    if os.geteuid() != 0 or _reachable(requested.parent, _service_account()):
        return requested
    return _relocated(requested)


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
            remove(data_dir)  # relocated too, should TMPDIR be a private folder
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


def socket_dir(data_dir: Path) -> Path:
    """The short, per-cluster directory under /tmp that holds the socket of the
    server whose actual data directory (data_location()) is data_dir."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return Path("/tmp") / f"govledger-sock-{digest}"


def find_binaries(search: Iterable[Path] | None = None) -> Path:
    """The first directory of `search` that holds initdb, pg_ctl, postgres and psql;
    by default the directory of `pg_ctl` on PATH, then /usr/lib/postgresql/*/bin,
    newest first. Installs nothing: ClusterError(NOT_FOUND) when there is none."""
    for bindir in _default_search() if search is None else search:
        if all(os.access(bindir / name, os.X_OK) for name in _REQUIRED):
            return bindir
    raise ClusterError(NOT_FOUND)


def install() -> Path:
    """find_binaries(), after `apt-get install postgresql` when there are none and
    we are root on a system with apt-get. For the Makefile and CI, never the service."""
    with contextlib.suppress(ClusterError):
        return find_binaries()
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterError(
            "PostgreSQL server binaries (initdb, pg_ctl) not found, and installing"
            " them needs root and apt-get: install PostgreSQL 13 or later yourself,"
            " or set DATABASE_URL."
        )
    _apt_install_postgresql()
    return find_binaries()


def _ensure_started(
    data_dir: Path, settings: dict[str, str], database: str, *, fast: bool
) -> str:
    for name in [database, *settings]:
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a plain lowercase PostgreSQL name")
    bindir = find_binaries()
    requested = data_dir.resolve()
    data_dir = data_location(requested)
    relocated = data_dir != requested
    with _os_errors(data_dir):
        _make_dir(data_dir, for_server=os.geteuid() == 0)
        with _locked(data_dir):
            account = _account(data_dir)
            _check_reachable(data_dir.parent, account)
            if relocated:
                log.warning(
                    "data_dir_relocated",
                    requested=str(requested),
                    data_dir=str(data_dir),
                    reason=f"{_name(account)} cannot reach {requested}",
                )
            if not (data_dir / "PG_VERSION").is_file():
                _initdb(bindir, data_dir, account, fast=fast)
                if relocated:
                    _write(data_dir / _REQUESTED, f"{requested}\n", account)
            if not _is_running(bindir, data_dir, account):
                _start(bindir, data_dir, account, settings)
            host, port = _address(data_dir)
            _create_database(bindir, host, port, database)
    return _dsn(host, port, database)


def _existing(requested: Path) -> Path | None:
    """The directory holding the cluster asked for at `requested` (resolved), if any:
    the path itself, else (as root) its relocated place."""
    places = [requested]
    if os.geteuid() == 0:
        places.append(_relocated(requested))
    for place in places:
        with contextlib.suppress(OSError):  # a directory we may not enter: none
            if (place / "PG_VERSION").is_file():
                return place
    return None


def _relocated(requested: Path) -> Path:
    digest = hashlib.sha256(str(requested).encode()).hexdigest()[:16]
    return RELOCATION_ROOT / digest


def _reachable(path: Path, account: _Account) -> bool:
    """Whether the account can reach path's deepest existing directory, tested by
    access(2) in a process of that account (search permission on every directory
    on the way, and on that one)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    return _run(["test", "-x", existing], account=account, check=False).returncode == 0


def _check_reachable(path: Path, account: _Account | None) -> None:
    if account is not None and not _reachable(path, account):
        raise ClusterError(
            f"user {account.name} cannot reach {path}: make every directory on the"
            f" way searchable to it (chmod o+x), or {_ELSEWHERE}."
        )


def _make_dir(path: Path, *, for_server: bool) -> None:
    """mkdir -p; as root the missing parents are 0755 whatever the umask, so that the
    server's account can pass through them, and the data directory is 0700."""
    for parent in reversed(path.parents):
        if not parent.is_dir():
            parent.mkdir(exist_ok=True)
            if for_server:
                parent.chmod(0o755)
    path.mkdir(mode=0o700, exist_ok=True)


def _write(path: Path, text: str, account: _Account | None) -> None:
    path.write_text(text)
    if account is not None:
        os.chown(path, account.uid, account.gid)


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
        raise ClusterError(
            f"initdb failed in {data_dir} as {_name(account)}"
            f" ({_reason(_output(result))}): fix that, or {_ELSEWHERE}.",
            detail=_output(result),
        )
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
    _write(
        data_dir / _CONF,
        "".join(f"{k} = {_quote(v)}\n" for k, v in values.items()),
        account,
    )
    logfile = data_dir / _LOG
    result = _pg_ctl(bindir, data_dir, "-l", logfile, "-w", "start", account=account)
    if result.returncode != 0:
        with contextlib.suppress(OSError):
            sockets.rmdir()
        tail = _tail(logfile)
        reason = _reason(tail, _output(result))
        raise ClusterError(
            f"PostgreSQL did not start in {data_dir} ({reason}): see {logfile}, fix"
            f" that, or {_ELSEWHERE}.",
            detail=f"{_output(result)}\nlast lines of {logfile}:\n{tail}",
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
        raise ClusterError(
            f"{path} exists and is not a directory of this user: remove it and start"
            " again."
        )
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
        raise ClusterError(
            f"the server in {data_dir} does not listen on a Unix socket: stop it"
            f" (python -m service.pgcluster stop {data_dir}) and start again."
        )
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


def _name(account: _Account | None) -> str:
    if account is not None:
        return f"user {account.name}"
    return f"user {pwd.getpwuid(os.geteuid()).pw_name}"


def _service_account() -> _Account:
    for name in ("postgres", "govledger"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _Account(entry.pw_uid, entry.pw_gid)
    if shutil.which("useradd") is None:
        raise ClusterError(
            "PostgreSQL cannot run as root and there is no `postgres` user: create"
            " one, run as an unprivileged user, or set DATABASE_URL."
        )
    _run(["useradd", "--system", "--user-group", "--no-create-home", "govledger"])
    entry = pwd.getpwnam("govledger")
    return _Account(entry.pw_uid, entry.pw_gid)


def _default_search() -> list[Path]:
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
    return candidates


def _apt_install_postgresql() -> None:
    log.warning("postgresql_installing", command="apt-get install -y postgresql")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        # stdout=2: apt's progress goes to stderr; the CLI's stdout is the bindir.
        done = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, stdout=2)
        if done.returncode != 0:
            raise ClusterError(
                f"`{' '.join(args)}` failed (exit {done.returncode}): install"
                " PostgreSQL 13 or later yourself, or set DATABASE_URL."
            )


def _run(
    args: Sequence[str | Path], *, account: _Account | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    # PG* variables (PGPORT, PGOPTIONS, ...) would change what the tools connect to.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    name = Path(args[0]).name
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
        raise ClusterError(
            f"{name} did not finish in {_TIMEOUT} s: retry when the machine is less"
            f" busy, or {_SERVER}."
        ) from exc
    except OSError as exc:
        raise ClusterError(
            f"cannot run {args[0]} ({exc.strerror}): install it, or {_SERVER}."
        ) from exc
    if check and result.returncode != 0:
        raise ClusterError(
            f"{name} failed (exit {result.returncode}, {_reason(_output(result))}):"
            f" fix that, or {_SERVER}.",
            detail=_output(result),
        )
    return result


@contextlib.contextmanager
def _os_errors(data_dir: Path) -> Iterator[None]:
    """An OSError (a directory that cannot be made or entered, a full disk) as a
    ClusterError."""
    try:
        yield
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise ClusterError(
            f"cannot use{where} for the cluster in {data_dir}"
            f" ({exc.strerror or exc}): fix that, or {_ELSEWHERE}."
        ) from exc


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


def _reason(*texts: str) -> str:
    """The line that says why, in one line: the last one with an error marker (the
    first text first), else the last line of the last text that has one."""
    for text in texts:
        for line in reversed(text.splitlines()):
            for marker in _MARKERS:
                if marker in line:
                    return _short(line[line.index(marker) :])
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    return _short(lines[-1]) if lines else "no output"


def _short(line: str, limit: int = 300) -> str:
    line = " ".join(line.split()).rstrip(".")
    return line if len(line) <= limit else line[: limit - 1] + "…"


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
    commands.add_parser("remove", help="stop and delete the cluster's data directory")
    commands.add_parser("where", help="print the cluster's actual data directory")
    for command in ("start", "stop", "status", "remove", "where"):
        commands.choices[command].add_argument("data_dir", type=Path)
    commands.add_parser("bindir", help="print the binaries' directory; install nothing")
    commands.add_parser(
        "install", help="as bindir, after apt-get install postgresql if none is found"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            pairs = [item.partition("=") for item in args.set]
            if any(not sep for _, sep, _ in pairs):
                parser.error("--set takes NAME=VALUE")
            print(ensure_started(args.data_dir, settings={k: v for k, _, v in pairs}))
        elif args.command == "stop":
            stop(args.data_dir)
        elif args.command == "remove":
            remove(args.data_dir)
        elif args.command == "where":
            print(data_location(args.data_dir))
        elif args.command == "status":
            dsn = status(args.data_dir)
            print(dsn or "stopped")
            return 0 if dsn else 3
        elif args.command == "install":
            print(install())
        else:
            print(find_binaries())
    except (ClusterError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    sys.exit(main())
