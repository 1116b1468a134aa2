"""The README's tests run in the SSH tests' worker, one after the other: installing the Quick start
and running the example fleet costs CPU that must not land on the SSH tests' timing bounds."""
from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.xdist_group("ssh"))
