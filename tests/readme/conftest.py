"""The README's tests run in the SSH tests' worker, one after the other: installing the Quick start
and running the example fleet costs CPU that must not land on the SSH tests' timing bounds."""
from __future__ import annotations

from pathlib import Path

import pytest


# tryfirst: xdist's own hook turns the group marker into the test's id suffix (what --dist loadgroup
# distributes by), so the marker must be there before it runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            # In the SSH tests' worker, one after the other: a burst of CPU (a server's initdb, a
            # browser, a fresh clone's pip install) must not land on their handshakes and timing bounds.
            item.add_marker(pytest.mark.xdist_group("ssh"))
