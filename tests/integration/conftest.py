"""Integration tests talk to the real broker: every test in this folder is marked ``integration``.

(A ``pytestmark`` in a conftest marks nothing, so the marker is added at collection.)
"""

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)
