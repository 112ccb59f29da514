"""Integration tests talk to the real broker."""

import pytest

pytestmark = pytest.mark.integration
