"""The public API: what ``amqp_agents`` and each module export."""

import importlib
import importlib.metadata
import pkgutil
import re
from types import ModuleType

import pytest

import amqp_agents
from amqp_agents import errors


def _isort_key(name: str) -> tuple[int, list[int | str]]:
    """Ruff's RUF022 "isort-style" order: CONSTANTS, then Classes, then functions; natural
    order within each group (so ``DEFAULT_URL`` precedes ``ConnectionSettings``)."""
    if len(name) > 1 and name.upper() == name and name.lower() != name:
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    natural: list[int | str] = [
        int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name) if part
    ]
    return group, natural


def _modules() -> list[ModuleType]:
    """Every module of the package, imported (``__main__`` would run the CLI)."""
    names = [
        info.name
        for info in pkgutil.walk_packages(amqp_agents.__path__, "amqp_agents.")
        if not info.name.endswith(".__main__")
    ]
    return [amqp_agents, *(importlib.import_module(name) for name in names)]


MODULES_WITH_ALL = [module for module in _modules() if hasattr(module, "__all__")]


def test_isort_key_orders_groups_then_naturally() -> None:
    """The sort key used below puts constants, classes, functions in that order."""
    names = ["load", "Agent", "MAX_2", "MAX_10", "Agent2", "Agent10", "action"]

    assert sorted(names, key=_isort_key) == [
        "MAX_2",
        "MAX_10",
        "Agent",
        "Agent2",
        "Agent10",
        "action",
        "load",
    ]


def test_package_all_is_sorted_unique_and_resolves() -> None:
    """amqp_agents.__all__ is sorted, has no duplicates, and every name is importable."""
    exported = amqp_agents.__all__

    assert exported == sorted(exported, key=_isort_key)
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert getattr(amqp_agents, name) is not None, name


def test_walk_finds_the_package_modules() -> None:
    """The module walk reaches nested modules, so the __all__ checks are not vacuous."""
    names = {module.__name__ for module in MODULES_WITH_ALL}

    assert {"amqp_agents.errors", "amqp_agents.models.wire", "amqp_agents.runtime.agent"} <= names


@pytest.mark.parametrize("module", MODULES_WITH_ALL, ids=lambda module: module.__name__)
def test_module_all_is_sorted_unique_and_resolves(module: ModuleType) -> None:
    """Each module's __all__ is sorted, has no duplicates, and names only real attributes."""
    exported = list(module.__all__)

    assert exported == sorted(exported, key=_isort_key)
    assert len(set(exported)) == len(exported)
    missing = [name for name in exported if not hasattr(module, name)]
    assert missing == []


def test_every_error_is_exported_from_the_package() -> None:
    """Callers can catch every exception of the tree from the top-level package."""
    for name in errors.__all__:
        assert getattr(amqp_agents, name) is getattr(errors, name), name
        assert name in amqp_agents.__all__, name


def test_version_matches_distribution() -> None:
    """__version__ is the installed distribution's version."""
    assert amqp_agents.__version__ == importlib.metadata.version("amqp-agents")
