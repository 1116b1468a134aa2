"""Fixtures of the hostile-input corpus (see kit.py): the world each module's cases copy, prepared once
per module (a module may add to it with `WORLD`, a mapping of path -> content, and `WORLD_THEN`, a
step run after it), and the check that permission bits bind the CLI run as root."""
from __future__ import annotations

import pytest

from tests.corpus.kit import World, prepare
from tests.integration.harness import permission_problem
from tests.support import require


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    return prepare(tmp_path_factory.mktemp("world"), getattr(request.module, "WORLD", None),
                   getattr(request.module, "WORLD_THEN", None))


@pytest.fixture(scope="session")
def permission_bits_bind(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip (fail under CI) unless a command run as root really meets permission bits."""
    require(permission_problem(tmp_path_factory.mktemp("closed")))
