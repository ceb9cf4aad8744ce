"""Shadow copies of a projection's tables: the live tables' shape copied into another
schema from the catalogue, and rows compared between two schemas as a multiset.

A copy has the live columns, defaults, identity, constraints and indexes (under their
own names); `use` puts its schema first on the search path, so unqualified SQL runs
against the copy while `events` and `projection_checkpoints`, which exist only in
`public`, still resolve there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import msgspec

from service.eventstore import Connection


class ShadowError(Exception):
    """Live tables that cannot be copied (none, referenced from outside, an index)."""


class TableDiff(msgspec.Struct, frozen=True, kw_only=True):
    """Rows of one table found only live (`missing` from the replay) or only in it."""

    table: str
    missing: int
    extra: int
    lines: list[str]


async def use(conn: Connection, schema: str) -> None:
    """Unqualified names resolve in `schema` first, for this transaction only."""
    await conn.execute(
        "SELECT set_config('search_path', $1, true)", f"{schema}, public"
    )


# --- copying the live tables' shape ------------------------------------------------

_TABLES = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind = 'r' AND starts_with(c.relname, $1)
ORDER BY c.relname
"""
# Printed while search_path is only `public`, so references come out unqualified and
# bind to the copies when replayed with the copy's schema first.
_CONSTRAINTS = """
SELECT t.relname, c.conname, pg_get_constraintdef(c.oid) AS definition
FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname = 'public' AND t.relname = ANY($1::text[])
  AND c.contype IN ('p', 'u', 'x', 'c', 'f')
ORDER BY position(c.contype IN 'puxcf'), t.relname, c.conname
"""
_INDEXES = """
SELECT t.relname, pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname = 'public' AND t.relname = ANY($1::text[])
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
ORDER BY t.relname
"""
# Storage parameters set on a live table (fillfactor: see migration 0009).
_OPTIONS = """
SELECT c.relname, c.reloptions FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relname = ANY($1::text[]) AND c.reloptions IS NOT NULL
"""
_REFERENCED_FROM_OUTSIDE = """
SELECT c.conname FROM pg_constraint c
JOIN pg_class t ON t.oid = c.conrelid JOIN pg_class r ON r.oid = c.confrelid
JOIN pg_namespace n ON n.oid = r.relnamespace
WHERE c.contype = 'f' AND n.nspname = 'public' AND r.relname = ANY($1::text[])
  AND NOT (t.relnamespace = r.relnamespace AND t.relname = ANY($1::text[]))
"""


async def live_tables(conn: Connection, prefix: str) -> list[str]:
    """The tables in `public` whose names start with `prefix`."""
    return [r["relname"] for r in await conn.fetch(_TABLES, prefix)]


async def copy_tables(conn: Connection, prefix: str, schema: str) -> list[str]:
    """(Re)create `schema` with empty copies of the live tables named `prefix`*."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('search_path', 'public', true)")
        tables = await live_tables(conn, prefix)
        if not tables:
            raise ShadowError(f"no tables named {prefix}* in schema public")
        outside = await conn.fetch(_REFERENCED_FROM_OUTSIDE, tables)
        if outside:
            names = ", ".join(r["conname"] for r in outside)
            raise ShadowError(f"other tables reference the projection's: {names}")
        constraints = await conn.fetch(_CONSTRAINTS, tables)
        indexes = await conn.fetch(_INDEXES, tables)
        options = {
            r["relname"]: r["reloptions"] for r in await conn.fetch(_OPTIONS, tables)
        }
        # One script, one round trip, run with the copy's schema first (see above).
        await use(conn, schema)
        script = [f"DROP SCHEMA IF EXISTS {schema} CASCADE", f"CREATE SCHEMA {schema}"]
        script.extend(
            f"CREATE TABLE {schema}.{_ident(table)} (LIKE public.{_ident(table)}"
            " INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING IDENTITY"
            f" INCLUDING STORAGE){_with(options.get(table))}"
            for table in tables
        )
        script.extend(
            f"ALTER TABLE {schema}.{_ident(c['relname'])}"
            f" ADD CONSTRAINT {_ident(c['conname'])} {c['definition']}"
            for c in constraints
        )
        script.extend(
            _retarget_index(i["definition"], i["relname"], schema) for i in indexes
        )
        await conn.execute(";\n".join(script))
    return tables


def _with(options: list[str] | None) -> str:
    """A table's storage parameters (`reloptions`, each `name=value`) as the WITH
    clause of a copy; none: nothing. LIKE copies none of them."""
    if not options:
        return ""
    pairs = (option.split("=", 1) for option in options)
    quoted = (
        ".".join(_ident(part) for part in name.split(".")) + " = " + _literal(value)
        for name, value in pairs
    )
    return " WITH (" + ", ".join(quoted) + ")"


def _retarget_index(definition: str, table: str, schema: str) -> str:
    """`CREATE INDEX name ON public.t USING …` → the same index on `schema`.t."""
    name = f"{re.escape(_ident(table))}|{re.escape(table)}"
    pattern = rf" ON (ONLY )?(public\.)?({name}) USING "
    retargeted, found = re.subn(
        pattern, f" ON {schema}.{_ident(table)} USING ", definition, count=1
    )
    if not found:
        raise ShadowError(f"cannot copy index: {definition}")
    return retargeted


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --- comparing ---------------------------------------------------------------------

_COLUMNS = """
SELECT a.attname, a.attidentity <> '' AS is_identity
FROM pg_attribute a
WHERE a.attrelid = format('public.%I', $1::text)::regclass
  AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
# Single-column foreign keys to an identity column, and the referenced table's first
# unique constraint: the natural key that stands in for the surrogate id.
_IDENTITY_REFERENCES = """
SELECT a.attname AS column, r.relname AS referenced, ra.attname AS referenced_column,
    (SELECT array_agg(ua.attname ORDER BY ua.attnum)
     FROM pg_constraint u JOIN pg_attribute ua
       ON ua.attrelid = u.conrelid AND ua.attnum = ANY(u.conkey)
     WHERE u.conrelid = r.oid AND u.contype = 'u'
       AND u.oid = (SELECT min(u2.oid) FROM pg_constraint u2
                    WHERE u2.conrelid = r.oid AND u2.contype = 'u')) AS natural_key
FROM pg_constraint c
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
JOIN pg_class r ON r.oid = c.confrelid
JOIN pg_attribute ra ON ra.attrelid = c.confrelid AND ra.attnum = c.confkey[1]
WHERE c.conrelid = format('public.%I', $1::text)::regclass AND c.contype = 'f'
  AND cardinality(c.conkey) = 1 AND ra.attidentity <> ''
"""
_PRIMARY_KEY = """
SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_constraint c
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)
WHERE c.conrelid = format('public.%I', $1::text)::regclass
  AND c.contype = 'p' AND a.attidentity = ''
"""


async def _row_expression(conn: Connection, table: str) -> tuple[str, list[str]]:
    """A jsonb expression of a row of `table` (alias t, schema {schema}) without its
    identity columns, references to identity columns replaced by natural keys; and
    the columns that identify a row for pairing (its primary key, else all)."""
    columns = await conn.fetch(_COLUMNS, table)
    references = {
        r["column"]: r
        for r in await conn.fetch(_IDENTITY_REFERENCES, table)
        if r["natural_key"]
    }
    pairs: list[str] = []
    for column in columns:
        name = column["attname"]
        if column["is_identity"]:
            continue
        ref = references.get(name)
        if ref is None:
            pairs.append(f"{_literal(name)}, t.{_ident(name)}")
            continue
        natural = ", ".join(f"{_literal(k)}, r.{_ident(k)}" for k in ref["natural_key"])
        pairs.append(
            f"{_literal(name)}, (SELECT jsonb_build_object({natural})"
            f" FROM {{schema}}.{_ident(ref['referenced'])} r"
            f" WHERE r.{_ident(ref['referenced_column'])} = t.{_ident(name)})"
        )
    key = await conn.fetchval(_PRIMARY_KEY, table)
    return f"jsonb_build_object({', '.join(pairs)})", list(key or [])


async def compare(
    conn: Connection,
    tables: Sequence[str],
    live: str,
    replayed: str,
    *,
    shown: int = 20,
) -> list[TableDiff]:
    """Rows that differ between two schemas' copies of `tables`, as a multiset."""
    diffs: list[TableDiff] = []
    for table in tables:
        expression, key = await _row_expression(conn, table)
        side = {
            schema: f"SELECT {expression.format(schema=schema)} AS row"
            f" FROM {schema}.{_ident(table)} t"
            for schema in (live, replayed)
        }
        only: dict[str, list[dict[str, Any]]] = {}
        counts: dict[str, int] = {}
        for one, other in ((live, replayed), (replayed, live)):
            rows = await conn.fetch(
                f"SELECT row::text, count(*) OVER () AS n FROM"
                f" ({side[one]} EXCEPT ALL {side[other]}) AS d ORDER BY 1 LIMIT $1",
                shown,
            )
            only[one] = [_decode_row(r["row"]) for r in rows]
            counts[one] = rows[0]["n"] if rows else 0
        if counts[live] or counts[replayed]:
            diffs.append(
                TableDiff(
                    table=table,
                    missing=counts[live],
                    extra=counts[replayed],
                    lines=_diff_lines(only[live], only[replayed], key),
                )
            )
    return diffs


async def snapshot(
    conn: Connection, tables: Sequence[str], schema: str
) -> dict[str, list[str]]:
    """Every row of `tables` in `schema`, as compared (sorted JSON): for equality
    checks across databases, where `compare` cannot reach."""
    out: dict[str, list[str]] = {}
    for table in tables:
        expression, _key = await _row_expression(conn, table)
        rows = await conn.fetch(
            f"SELECT {expression.format(schema=schema)}::text AS row"
            f" FROM {schema}.{_ident(table)} t ORDER BY 1"
        )
        out[table] = [r["row"] for r in rows]
    return out


def _diff_lines(
    live: list[dict[str, Any]], replayed: list[dict[str, Any]], key: list[str]
) -> list[str]:
    """Rows paired by key show their differing columns; the rest show whole."""

    def ident(row: dict[str, Any]) -> tuple[str, ...]:
        return tuple(str(row.get(k)) for k in key)

    by_key = {ident(r): r for r in replayed} if key else {}
    lines: list[str] = []
    paired: set[tuple[str, ...]] = set()
    for row in live:
        other = by_key.get(ident(row))
        if other is None:
            lines.append(f"- live only:   {_json(row)}")
            continue
        paired.add(ident(row))
        changed = [
            f"{c}: live {_json(row.get(c))} != replay {_json(other.get(c))}"
            for c in sorted(set(row) | set(other))
            if row.get(c) != other.get(c)
        ]
        where = ", ".join(f"{k}={row.get(k)}" for k in key)
        lines.append(f"~ {where}: " + "; ".join(changed))
    lines.extend(
        f"+ replay only: {_json(r)}" for r in replayed if ident(r) not in paired
    )
    return lines


_decode_row = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal).decode
_encode_value = msgspec.json.Encoder(decimal_format="number").encode


def _json(value: Any) -> str:
    return _encode_value(value).decode()


def render(diffs: Sequence[TableDiff]) -> str:
    """The readable diff of `compare`."""
    out: list[str] = []
    for d in diffs:
        out.append(
            f"{d.table}: {d.missing} row(s) only live, {d.extra} only in the replay"
        )
        out.extend(f"  {line}" for line in d.lines)
    return "\n".join(out)
