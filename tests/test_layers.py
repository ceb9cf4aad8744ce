"""Imports point one way: domain ← records/eventstore ← projections ← web ← cli.

Each module of the service may import only modules of its own layer or of layers to
its left; the client imports nothing of the server; the service never imports the
dev-only tools. Read from the source with `ast`, so a lazy import inside a function
counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Layer of a module, by the longest matching prefix; higher layers may import lower.
LAYERS: dict[str, int] = {
    "service.domain": 0,
    "service.errors": 0,
    "service": 1,  # records, eventstore, ingest, idempotency, transfer, rewrite, …
    "projections": 2,
    "service.web": 3,
    "service.cli": 4,
    "service.__main__": 4,
}
LAYER_NAMES = ("domain", "records/eventstore", "projections", "web", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for prefix, layer in LAYERS.items():
        matches = module == prefix or module.startswith(prefix + ".")
        if matches and (best is None or len(prefix) > best[0]):
            best = (len(prefix), layer)
    return None if best is None else best[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from pkg import mod` imports pkg.mod when mod is a module.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(
                    ".py"
                ).exists() or (ROOT / Path(*candidate.split("."))).is_dir()
                found.append((node.lineno, candidate if is_module else target))
    return found


def sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def test_every_service_module_has_a_layer() -> None:
    unplaced = [
        module_name(p)
        for p in sources("service", "projections")
        if layer_of(module_name(p)) is None
    ]
    assert unplaced == []


def test_no_import_points_to_a_layer_on_its_right() -> None:
    backwards = []
    for path in sources("service", "projections"):
        module = module_name(path)
        own = layer_of(module)
        assert own is not None
        for line, target in imports_of(path):
            other = layer_of(target)
            if other is not None and other > own:
                backwards.append(
                    f"{path.relative_to(ROOT)}:{line} ({LAYER_NAMES[own]}) imports"
                    f" {target} ({LAYER_NAMES[other]})"
                )
    assert backwards == []


@pytest.mark.parametrize("package", ["service", "projections"])
def test_the_service_never_imports_the_tools(package: str) -> None:
    offending = [
        f"{p.relative_to(ROOT)}:{line} imports {target}"
        for p in sources(package)
        for line, target in imports_of(p)
        if target == "tools" or target.startswith("tools.")
    ]
    assert offending == []


def test_the_domain_and_the_records_are_pure() -> None:
    """No asyncpg, aiohttp, structlog or clock module below the event store."""
    impure = []
    pure = [*sources("service/domain"), ROOT / "service/records.py"]
    for path in pure:
        for line, target in imports_of(path):
            top = target.split(".")[0]
            if top in ("service", "__future__"):
                continue
            if top in ("asyncpg", "aiohttp", "structlog", "time", "asyncio"):
                impure.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert impure == []


def test_projections_know_nothing_of_aiohttp() -> None:
    offending = [
        f"{p.relative_to(ROOT)}:{line} imports {target}"
        for p in sources("projections")
        for line, target in imports_of(p)
        if target.split(".")[0] == "aiohttp"
    ]
    assert offending == []


def test_only_the_web_package_imports_aiohttp_web() -> None:
    offending = [
        f"{p.relative_to(ROOT)}:{line} imports {target}"
        for p in sources("service", "projections")
        if not module_name(p).startswith("service.web")
        for line, target in imports_of(p)
        if target in ("aiohttp.web", "aiohttp") and module_name(p) != "service.cli"
    ]
    assert offending == []


def test_the_client_imports_nothing_of_the_server() -> None:
    offending = [
        f"{p.relative_to(ROOT)}:{line} imports {target}"
        for p in sources("client")
        for line, target in imports_of(p)
        if target.split(".")[0] in ("service", "projections", "tools")
    ]
    assert offending == []
