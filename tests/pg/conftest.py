"""The PostgreSQL tests (the server and database fixtures are in tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            # In the SSH tests' worker, one after the other: starting a server (initdb) is a burst of
            # CPU that must not land on the SSH tests' handshakes and timing bounds.
            item.add_marker(pytest.mark.xdist_group("ssh"))
