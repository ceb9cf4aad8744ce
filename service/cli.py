"""The `govledger` command: serve, migrate, and the operational tools; each one call."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TypeVar

import asyncpg
import msgspec
import structlog
from aiohttp import web

from projections import replay as replay_module
from service import log as logging_setup
from service.config import ConfigError, Settings, check_exposure
from service.pgcluster import ClusterError

log = structlog.get_logger()


REACH_TIMEOUT_S = 10.0


class DatabaseUnreachable(Exception):
    """DATABASE_URL names no PostgreSQL this process can use; `str()` is one
    sentence to print as it is."""


async def _reach(dsn: str) -> None:
    """Connect once to `dsn` and close, or raise ConfigError (not a PostgreSQL URL)
    or DatabaseUnreachable (no server there, or it refused us), one sentence each
    that names no password."""
    try:
        conn = await asyncpg.connect(dsn, timeout=REACH_TIMEOUT_S)
    except (asyncpg.ClientConfigurationError, ValueError) as exc:  # a bad port too
        raise ConfigError(f"DATABASE_URL is not a PostgreSQL URL: {exc}") from None
    except (OSError, TimeoutError) as exc:  # refused, no such host, no answer
        reason = exc.strerror or str(exc) or "no answer in time"
        raise DatabaseUnreachable(
            f"cannot connect to the PostgreSQL of DATABASE_URL ({reason}):"
            " start it, or correct DATABASE_URL"
        ) from None
    except asyncpg.PostgresError as exc:  # a wrong password, database or role
        raise DatabaseUnreachable(
            f"the PostgreSQL of DATABASE_URL refused the connection: {exc}"
        ) from None
    await conn.close()


def database_url(settings: Settings) -> str:
    """DATABASE_URL, or the embedded cluster under the data dir (started if needed).
    A DATABASE_URL is tried once first, so that a wrong one is one sentence."""
    if settings.database_url:
        asyncio.run(_reach(settings.database_url))
        return settings.database_url
    from service import pgcluster

    dsn = pgcluster.ensure_started(Path(settings.data_dir))
    where = pgcluster.data_location(Path(settings.data_dir))
    log.info("embedded_postgres_ready", data_dir=str(where))
    return dsn


def cmd_serve(args: argparse.Namespace) -> int:
    from service import event_loop
    from service.domain.upcast import validate_chains
    from service.migrate import migrate
    from service.web import server
    from service.web.app import create_app, keepalive_timeout

    validate_chains()
    settings = Settings.from_env()
    if args.no_projector:
        settings = msgspec.structs.replace(settings, projector="external")
    check_exposure(settings)
    if settings.is_open:
        log.warning(
            "serving_without_tokens",
            host=settings.host,
            hint="set GOVLEDGER_ADMIN_TOKENS to require bearer tokens",
        )
    embedded = not settings.database_url
    started_here = embedded and _embedded_status(settings) is None
    dsn = database_url(settings)
    try:
        asyncio.run(migrate(dsn))
        app = create_app(settings, dsn)
        app.on_startup.append(_freeze_heap)
        new_loop, loop_name = event_loop.factory(settings.event_loop)
        log.info(
            "serving",
            host=settings.host,
            port=settings.port,
            projector=settings.projector,
            event_loop=loop_name,
        )
        server.run(
            app,
            loop=new_loop(),
            host=settings.host,
            port=settings.port,
            shutdown_timeout=10,
            reuse_port=args.reuse_port,
            keepalive_timeout=keepalive_timeout(settings),
        )
    finally:
        if started_here:
            # Leave the machine as we found it: a cluster this serve started stops
            # with it, also when serving failed (the port taken, say).
            from service import pgcluster

            pgcluster.stop(Path(settings.data_dir))
    return 0


def _embedded_status(settings: Settings) -> str | None:
    from service import pgcluster

    return pgcluster.status(Path(settings.data_dir))


async def _freeze_heap(app: web.Application) -> None:
    """Move start-up objects out of the cyclic GC's sight: full collections then walk
    only what requests allocate (the ingest research measured +25% from this)."""
    gc.collect()
    gc.freeze()


def cmd_project(args: argparse.Namespace) -> int:
    from service import event_loop
    from service.domain.upcast import validate_chains

    validate_chains()
    settings = Settings.from_env()
    dsn = database_url(settings)
    new_loop, loop_name = event_loop.factory(settings.event_loop)
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(_project(dsn, settings, loop_name, with_parent=args.with_parent))
    return 0


async def _project(
    dsn: str, settings: Settings, loop_name: str, *, with_parent: bool
) -> None:
    """Apply the SQL read model's projector until SIGTERM or SIGINT (or, with a
    parent, until the parent's pipe on stdin closes)."""
    from projections import governance
    from projections.runner import Projector, Tail

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if with_parent:

        def parent_pipe_readable() -> None:
            if not os.read(sys.stdin.fileno(), 4096):  # end of file: the parent died
                loop.remove_reader(sys.stdin.fileno())
                log.warning("projector_parent_gone", parent=os.getppid())
                stop.set()

        loop.add_reader(sys.stdin.fileno(), parent_pipe_readable)
    pool = await _connected(dsn, stop)
    if pool is None:
        return
    projector = Projector(
        pool, "governance", governance.APPLIER, poll_interval_s=settings.poll_interval_s
    )
    tail = Tail(dsn)
    tail.start(projector)
    log.info(
        "projector_started",
        projection=projector.name,
        pid=os.getpid(),
        event_loop=loop_name,
    )
    try:
        await stop.wait()
    finally:
        # A batch in flight rolls back: its checkpoint moves in the same transaction.
        await tail.stop()
        await pool.close()
    log.info(
        "projector_stopped",
        projection=projector.name,
        position=projector.checkpoint.position,
    )


async def _connected(dsn: str, stop: asyncio.Event) -> asyncpg.Pool | None:
    """Migrate and open the projector's pool, waiting (retried at most every second)
    while the database cannot be reached: a projector started during an outage
    must be ready the moment it ends, not in its supervisor's back-off. None once
    `stop` is set first."""
    from service import eventstore
    from service.migrate import migrate

    # Out of reach, or gone while migrating (the outage began mid-start).
    unreachable: tuple[type[Exception], ...] = (
        *eventstore.UNREACHABLE,
        asyncpg.ConnectionDoesNotExistError,
    )
    delay = 0.0
    while not stop.is_set():
        try:
            await migrate(dsn)
            return await eventstore.create_pool(dsn, min_size=1, max_size=2)
        except unreachable as exc:
            delay = min(max(delay * 2, 0.1), 1.0)
            log.warning(
                "projector_waiting_for_database", error=repr(exc), retry_in_s=delay
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
    return None


def cmd_migrate(args: argparse.Namespace) -> int:
    from service.migrate import migrate

    dsn = database_url(Settings.from_env())
    applied = asyncio.run(migrate(dsn))
    print(
        f"applied {len(applied)} migrations"
        + (f": {', '.join(applied)}" if applied else "")
    )
    return 0


# --- operational tools: each a thin call into its module ---------------------------

T = TypeVar("T")


class Progress:
    """Progress lines (at most one a second) and the summary line of a long run,
    on stderr, so stdout stays free for data and reports."""

    def __init__(self, name: str, detail: str = "position") -> None:
        self.name = name
        self.detail = detail
        self.started = time.monotonic()
        self.shown = self.started

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def rate(self, events: int) -> float:
        return events / self.seconds if self.seconds > 0 else 0.0

    def show(self, events: int, detail: int) -> None:
        now = time.monotonic()
        if now - self.shown >= 1.0:
            self.shown = now
            print(
                f"{self.name}: {events} events, {self.detail} {detail},"
                f" {self.rate(events):.0f} events/s",
                file=sys.stderr,
                flush=True,
            )

    def summary(self, events: int, what: str = "") -> None:
        print(
            f"{self.name}: {events} events{what} in {self.seconds:.2f} s"
            f" ({self.rate(events):.0f} events/s)",
            file=sys.stderr,
            flush=True,
        )


def _with_pool(work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Migrate the database, then run `work` on a small pool of it."""
    from service import eventstore
    from service.migrate import migrate

    dsn = database_url(Settings.from_env())

    async def run() -> T:
        await migrate(dsn)
        pool = await eventstore.create_pool(dsn, min_size=1, max_size=4)
        try:
            return await work(pool)
        finally:
            await pool.close()

    return asyncio.run(run())


def _fail(command: str, exc: Exception, *, status: int = 1) -> int:
    print(f"govledger {command}: {exc}", file=sys.stderr)
    return status


def cmd_upcast(args: argparse.Namespace) -> int:
    from service import rewrite
    from service.domain import upcast

    upcast.validate_chains()
    progress = Progress("upcast")
    if args.dry_run:
        report = _with_pool(
            lambda pool: rewrite.dry_run(pool, on_progress=progress.show)
        )
        for key, count in report.counts.items():
            print(f"{key}: {count}")
        for sample in report.samples:
            print(rewrite.render_diff(sample), end="")
        for failure in report.failures:
            print(f"cannot upcast: {failure}")
        progress.summary(report.events, " to rewrite (dry run)")
        return 1 if report.failures else 0
    try:
        done = _with_pool(
            lambda pool: rewrite.rewrite(
                pool, batch_size=args.batch_size, on_progress=progress.show
            )
        )
    except (rewrite.RewriteFailed, rewrite.RewriteBusy) as exc:
        return _fail("upcast", exc)
    for key, count in done.counts.items():
        print(f"{key}: {count}", file=sys.stderr)
    progress.summary(done.events, f" rewritten by run {done.run_id}")
    return 0


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[IO[bytes]]:
    if path is None or path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
    else:
        with open(path, "wb") as out:
            yield out


def cmd_export(args: argparse.Namespace) -> int:
    from service import transfer

    progress = Progress("export", detail="written")
    with _output(args.file) as out:
        count = _with_pool(
            lambda pool: transfer.export(pool, out, on_progress=progress.show)
        )
    progress.summary(count, " exported")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from service import transfer

    progress = Progress("import", detail="appended")
    with open(args.file, "rb") as source:
        lines = transfer.bounded_lines(source)
        try:
            report = _with_pool(
                lambda pool: transfer.import_lines(
                    pool, lines, batch_size=args.batch_size, on_progress=progress.show
                )
            )
        except transfer.ImportFailed as exc:
            return _fail("import", exc)
    progress.summary(
        report.lines, f" read, {report.appended} appended, {report.present} present"
    )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from projections import replay, shadow

    progress = Progress("replay")
    try:  # what the arguments say wrong, before anything runs: a usage error
        replay.projection(args.projection)
        if args.at is not None and args.verify:
            raise replay.ReplayError("--verify compares with the live tables; not --at")
        if args.print and args.at is None:
            raise replay.ReplayError("--print needs --at")
        at = None if args.at is None else replay.parse_at(args.at, datetime.now(UTC))
    except replay.ReplayError as exc:
        return _fail("replay", exc, status=2)
    try:
        if at is not None:
            return _with_pool(lambda pool: _replay_at(pool, args, at, progress))
        report = _with_pool(
            lambda pool: replay.rebuild(
                pool,
                args.projection,
                verify=args.verify,
                batch_size=args.batch_size,
                on_progress=progress.show,
            )
        )
    except replay.ReplayError as exc:
        return _fail("replay", exc)
    where = f" up to position {report.checkpoint.position}"
    if report.differences:
        print(shadow.render(report.differences))
        progress.summary(
            report.events, f" replayed{where}; the live read model differs"
        )
        return 1
    if args.verify:
        progress.summary(
            report.events, f" replayed{where}; identical to the live tables"
        )
    else:
        progress.summary(report.events, f" replayed{where} and swapped in")
    return 0


async def _replay_at(
    pool: asyncpg.Pool, args: argparse.Namespace, at: int | datetime, progress: Progress
) -> int:
    from projections import replay

    report = await replay.build_at(
        pool,
        at,
        args.projection,
        batch_size=args.batch_size,
        on_progress=progress.show,
    )
    assert report.schema is not None
    assert report.as_of is not None
    if args.print:
        async with pool.acquire() as conn:
            state = await replay.read_state(conn, report.schema, report.as_of)
        sys.stdout.buffer.write(
            msgspec.json.format(_state_encoder.encode(state), indent=2) + b"\n"
        )
    rows = ", ".join(f"{t} {n}" for t, n in report.rows.items())
    print(f"schema {report.schema} ({rows})", file=sys.stderr)
    progress.summary(
        report.events,
        f" applied as of {args.at} (log read to position {report.checkpoint.position})",
    )
    return 0


_state_encoder = msgspec.json.Encoder(decimal_format="number")


def cmd_record(args: argparse.Namespace) -> int:
    import govledger_client as client  # a separate distribution: ./client

    token = args.token or os.environ.get("GOVLEDGER_TOKEN") or None
    return client.record_file(args.file, url=args.url, token=token)


def cmd_bench(args: argparse.Namespace) -> int:
    """Hand over to `python -m tools.bench` of the source checkout: the tools are
    not shipped, and the service never imports them."""
    checkout = Path(__file__).resolve().parents[1]  # the parent of service/
    if not (checkout / "tools" / "bench" / "__main__.py").is_file():
        print(
            "govledger bench runs from a source checkout: make bench", file=sys.stderr
        )
        return 2
    path = [str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tools.bench", *args.argv], env)


MAX_BATCH = 10_000


def batch_size(raw: str) -> int:
    """A --batch-size: a whole number from 1 to MAX_BATCH (0 would read nothing and
    end a replay at once; a larger one holds a transaction open too long)."""
    if not (raw.isascii() and raw.isdigit() and 0 < int(raw) <= MAX_BATCH):
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 1 to {MAX_BATCH:,}, not {raw!r}"
        )
    return int(raw)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="govledger", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the HTTP API")
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="SO_REUSEPORT, so several processes can share the port",
    )
    serve.add_argument(
        "--no-projector",
        action="store_true",
        help="start no `govledger project` child: it runs elsewhere"
        " (as GOVLEDGER_PROJECTOR=external)",
    )
    serve.set_defaults(func=cmd_serve)
    project = sub.add_parser(
        "project",
        help="apply the SQL read model's projector (serve starts one by default)",
    )
    project.add_argument(
        "--with-parent",
        action="store_true",
        help="stop when stdin reaches its end: how serve runs its child",
    )
    project.set_defaults(func=cmd_project)
    sub.add_parser("migrate", help="apply pending migrations").set_defaults(
        func=cmd_migrate
    )
    up = sub.add_parser("upcast", help="rewrite legacy events once, in place")
    up.add_argument(
        "--dry-run", action="store_true", help="change nothing; counts and a diff"
    )
    up.add_argument(
        "--batch-size", type=batch_size, default=500, help="rows per transaction"
    )
    up.set_defaults(func=cmd_upcast)
    export = sub.add_parser("export", help="write the log as JSONL envelopes")
    export.add_argument("file", nargs="?", help="output file (default: stdout)")
    export.set_defaults(func=cmd_export)
    imp = sub.add_parser("import", help="append JSONL envelopes to the log")
    imp.add_argument("file", help="a JSONL file of event envelopes")
    imp.add_argument(
        "--batch-size", type=batch_size, default=1000, help="lines per transaction"
    )
    imp.set_defaults(func=cmd_import)
    rep = sub.add_parser(
        "replay",
        help="rebuild a projection from the log and swap it in, verify it, or"
        " build it as of a past time or position",
    )
    rep.add_argument("--projection", default="governance", help="default: governance")
    rep.add_argument(
        "--at",
        metavar="TIME|POSITION",
        help="build the state as of then into an audit_* schema; live is untouched",
    )
    rep.add_argument(
        "--verify",
        action="store_true",
        help="compare a replay with the live tables; exit 1 with a diff if they differ",
    )
    rep.add_argument(
        "--print", action="store_true", help="with --at: print that state as JSON"
    )
    rep.add_argument(
        "--batch-size",
        type=batch_size,
        default=replay_module.BULK_BATCH,
        help="events per batch (one short transaction each)",
    )
    rep.set_defaults(func=cmd_replay)
    record = sub.add_parser(
        "record", help="send NDJSON usage records to a running service"
    )
    record.add_argument("file", help="an NDJSON file of usage records; - for stdin")
    record.add_argument("--url", default="http://127.0.0.1:8080", help="the service")
    record.add_argument("--token", help="bearer token (default: $GOVLEDGER_TOKEN)")
    record.set_defaults(func=cmd_record)
    # Its arguments belong to tools.bench, which parses them: none are read here.
    bench = sub.add_parser(
        "bench",
        help="benchmarks, each figure beside a baseline from the same run",
        add_help=False,
        prefix_chars="+",  # so --help and --reps reach tools.bench as they are
    )
    bench.add_argument("argv", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # A token given on the command line (`record --token`) is masked like one the
    # environment gives.
    token = getattr(args, "token", None)
    logging_setup.configure(
        cache=args.command in ("serve", "project"), secrets=[token] if token else ()
    )
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"govledger: {logging_setup.redact.mask_text(str(exc))}", file=sys.stderr)
        return 2
    except (ClusterError, DatabaseUnreachable) as exc:  # one sentence, no traceback
        print(f"govledger: {logging_setup.redact.mask_text(str(exc))}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of stdout left (`govledger export | head`): stop quietly, as
        # a command killed by SIGPIPE would, and let nothing flush into the pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:
        if exc.filename is None:  # not a file the command was given: a defect
            raise
        print(
            f"govledger {args.command}: {exc.filename}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
