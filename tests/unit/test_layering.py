"""Imports point down only: checked on the source with ast, without importing anything.

Layers, top to bottom: cli -> contract -> runtime -> rpc, events (siblings) -> transport
-> models.
Only the RabbitMQ transport module touches aio-pika.
"""

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import amqp_agents

PACKAGE_DIR = Path(amqp_agents.__file__).parent
RABBIT_PACKAGE = "amqp_agents.transport.rabbit"


@dataclass(frozen=True)
class Import:
    """One imported name (a module, or ``module.attr`` for ``from module import attr``)."""

    importer: str
    name: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.name}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of(source: str, module: str, *, is_package: bool = False) -> list[Import]:
    """Every import in ``source``, at any depth (functions, TYPE_CHECKING blocks), absolute."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append(Import(module, base, node.lineno))
            found += [Import(module, f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _all_imports() -> list[Import]:
    imports: list[Import] = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        imports += _imports_of(
            path.read_text(encoding="utf-8"),
            _module_name(path),
            is_package=path.name == "__init__.py",
        )
    return imports


IMPORTS = _all_imports()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(importers: str, forbidden: list[str]) -> list[str]:
    return [
        str(imp)
        for imp in IMPORTS
        if _within(imp.importer, importers)
        and any(_within(imp.name, target) for target in forbidden)
    ]


def test_import_collector_sees_every_form() -> None:
    """The collector finds plain, from, relative, nested and TYPE_CHECKING imports."""
    source = (
        "import aio_pika.abc\n"
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from ..transport import base\n"
        "if TYPE_CHECKING:\n"
        "    from amqp_agents.cli import main\n"
        "def f():\n"
        "    import aiormq\n"
    )

    names = {imp.name for imp in _imports_of(source, "amqp_agents.rpc.client")}

    assert {
        "aio_pika.abc",
        "amqp_agents.rpc.sibling",
        "amqp_agents.transport.base",
        "amqp_agents.cli.main",
        "aiormq",
    } <= names


def test_collector_sees_the_package() -> None:
    """The scan covers the real package (so an empty scan cannot pass the rules)."""
    importers = {imp.importer for imp in IMPORTS}

    assert {
        "amqp_agents.cli.app",
        f"{RABBIT_PACKAGE}.link",
        "amqp_agents.models.wire",
        "amqp_agents.contract.asyncapi",
    } <= importers
    assert any(imp.name == "aio_pika" for imp in IMPORTS)


def test_only_the_rabbit_transport_imports_aio_pika() -> None:
    """aio_pika and aiormq are imported by the transport/rabbit package and nowhere else."""
    offenders = [
        str(imp)
        for imp in IMPORTS
        if not _within(imp.importer, RABBIT_PACKAGE)
        and any(_within(imp.name, lib) for lib in ("aio_pika", "aiormq"))
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("amqp_agents.models", ["transport", "rpc", "events", "runtime", "contract", "cli"]),
        ("amqp_agents.transport", ["rpc", "events", "runtime", "contract", "cli"]),
        ("amqp_agents.rpc", ["events", "runtime", "contract", "cli"]),
        ("amqp_agents.events", ["rpc", "runtime", "contract", "cli"]),
        ("amqp_agents.runtime", ["contract", "cli"]),
        ("amqp_agents.contract", ["cli"]),
        ("amqp_agents.tracing", ["rpc", "events", "runtime", "contract", "cli"]),
    ],
    ids=["models", "transport", "rpc", "events", "runtime", "contract", "tracing"],
)
def test_imports_point_down(layer: str, forbidden: list[str]) -> None:
    """No layer imports a layer above it (rpc and events, siblings, not each other)."""
    assert _violations(layer, [f"amqp_agents.{name}" for name in forbidden]) == []


LEAVES = {
    "amqp_agents.errors": [],
    "amqp_agents.bounds": [],
    "amqp_agents.logs": [],
    "amqp_agents.models": ["amqp_agents.errors"],
    "amqp_agents.config": ["amqp_agents.errors", "amqp_agents.models"],
    "amqp_agents.metrics": ["amqp_agents.errors", "amqp_agents.models"],
}
"""The leaves of the package, and the only modules of the package each may import."""


@pytest.mark.parametrize(("leaf", "allowed"), LEAVES.items(), ids=list(LEAVES))
def test_leaves_import_only_below_them(leaf: str, allowed: list[str]) -> None:
    """errors, bounds and logs import nothing of the package; models only errors; config
    and metrics only errors and models: each can be read (and reused) on its own."""
    offenders = [
        str(imp)
        for imp in IMPORTS
        if _within(imp.importer, leaf)
        and _within(imp.name, "amqp_agents")
        and not any(_within(imp.name, target) for target in [leaf, *allowed])
    ]
    assert offenders == []


def test_leaf_check_sees_a_violation() -> None:
    """The leaf rule is not vacuous: errors really is imported by models (allowed), and a
    made-up import from errors into models would be caught."""
    fake = _imports_of("from amqp_agents.models import wire\n", "amqp_agents.errors")
    assert any(_within(imp.name, "amqp_agents.models") for imp in fake)
    assert any(
        imp.importer.startswith("amqp_agents.models") and imp.name.startswith("amqp_agents.errors")
        for imp in IMPORTS
    )


def test_tracing_is_imported_only_for_types_or_by_the_cli() -> None:
    """OpenTelemetry is optional: the library names Tracing only under TYPE_CHECKING
    (an annotation), so nothing imports it unless the application or the CLI asks."""
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        module = _module_name(path)
        if _within(module, "amqp_agents.tracing") or _within(module, "amqp_agents.cli"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        offenders += [
            f"{module}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            and id(node) not in guarded
            and any(
                _within(imp.name, target)
                for imp in _imports_of(
                    ast.unparse(node), module, is_package=path.name == "__init__.py"
                )
                for target in ("amqp_agents.tracing", "opentelemetry")
            )
        ]
    assert offenders == []


def test_examples_are_imported_only_by_the_cli() -> None:
    """Library code never depends on the example app."""
    offenders = [
        str(imp)
        for imp in IMPORTS
        if _within(imp.name, "amqp_agents.examples")
        and not _within(imp.importer, "amqp_agents.examples")
        and not _within(imp.importer, "amqp_agents.cli")
    ]
    assert offenders == []


def test_testing_helpers_are_not_imported_by_the_library() -> None:
    """amqp_agents.testing is for users' tests; the library itself never imports it."""
    offenders = [
        str(imp)
        for imp in IMPORTS
        if _within(imp.name, "amqp_agents.testing")
        and not _within(imp.importer, "amqp_agents.testing")
    ]
    assert offenders == []


def _get_event_loop_calls(source: str) -> list[int]:
    """Lines of ``get_event_loop()`` calls, as ``asyncio.get_event_loop()`` or bare."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name == "get_event_loop":
                lines.append(node.lineno)
    return lines


def test_get_event_loop_finder_sees_both_forms() -> None:
    """The finder catches the attribute and the bare-name call, not the running-loop one."""
    source = (
        "import asyncio\n"
        "from asyncio import get_event_loop\n"
        "LOOP = asyncio.get_event_loop()\n"
        "def f():\n"
        "    return get_event_loop(), asyncio.get_running_loop()\n"
    )

    assert _get_event_loop_calls(source) == [3, 5]


def test_no_get_event_loop() -> None:
    """No module calls get_event_loop(), at module level or anywhere else."""
    offenders = [
        f"{_module_name(path)}:{line}"
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        for line in _get_event_loop_calls(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
