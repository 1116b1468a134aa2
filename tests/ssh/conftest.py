"""Fixtures for tests that talk to real OpenSSH sshd daemons on loopback.

Import style: ``tests/`` and its subfolders have no ``__init__.py`` (pytest's
default "prepend" import mode puts each test file's own folder on sys.path).
To import the shared helper as ``tests.sshd_hosts`` no matter how pytest was
launched (``python -m pytest`` adds the cwd to sys.path, the ``pytest`` script
does not), this conftest puts the repository root on sys.path once;
``tests`` then resolves as a namespace package.  Test modules and benchmark
scripts use ``from tests.sshd_hosts import ...`` (a script run from elsewhere
does the same sys.path insert first).

Skip rule: when sshd cannot be used here every test in this folder is skipped
with a loud reason (and a banner in the terminal summary), unless ``CI=true``
or ``QUANTLAB_REQUIRE_SSHD=1``, in which case they fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


def _import_sshd_hosts():
    # ``tests`` is a namespace package; a *regular* package named ``tests``
    # installed in site-packages by some sloppy dependency would shadow it.
    # Then load our file by path and register it under the same name, so
    # ``from tests.sshd_hosts import ...`` in test modules still finds it.
    import importlib
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "sshd_hosts.py"
    try:
        mod = importlib.import_module("tests.sshd_hosts")
        if Path(mod.__file__).resolve() == path:
            return mod
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("tests.sshd_hosts", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tests.sshd_hosts"] = mod
    spec.loader.exec_module(mod)
    return mod


_sshd_hosts = _import_sshd_hosts()
SshdCluster = _sshd_hosts.SshdCluster
sshd_available = _sshd_hosts.sshd_available
sshd_required_by_env = _sshd_hosts.sshd_required_by_env

_THIS_DIR = Path(__file__).resolve().parent
_skip_reasons: set[str] = set()


def require_sshd() -> None:
    """Skip (or, under CI=true / QUANTLAB_REQUIRE_SSHD=1, fail) the current test
    when a real sshd cannot be started here."""
    ok, reason = sshd_available()
    if ok:
        return
    if sshd_required_by_env():
        pytest.fail(
            f"real sshd is required (CI=true or QUANTLAB_REQUIRE_SSHD=1) but unavailable: {reason}",
            pytrace=False,
        )
    _skip_reasons.add(reason)
    pytest.skip(f"!!! SSH TEST NOT RUN: real sshd unavailable: {reason} (set QUANTLAB_REQUIRE_SSHD=1 to fail instead)")


# tryfirst: xdist's own hook turns the group marker into the test's id suffix (what --dist loadgroup
# distributes by), so the marker must be there before it runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _THIS_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.ssh)
            # With pytest-xdist (`--dist loadgroup`), every SSH test runs in one worker, one after the
            # other: their sshd hosts and timing bounds are not shared with each other (the chaos
            # soak's load included).
            item.add_marker(pytest.mark.xdist_group("ssh"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _skip_reasons:
        terminalreporter.write_sep("!", "SSH TESTS SKIPPED: real sshd unavailable", red=True, bold=True)
        for reason in sorted(_skip_reasons):
            terminalreporter.write_line(f"  {reason}", red=True)
        terminalreporter.write_line("  (CI=true or QUANTLAB_REQUIRE_SSHD=1 turn these skips into failures)", red=True)


@pytest.fixture(autouse=True)
def _sshd_gate():
    require_sshd()


def _cluster_factory(tmp_path_factory):
    clusters: list[SshdCluster] = []

    def start(n: int = 3, **kwargs) -> SshdCluster:
        """Start ``n`` hosts in a fresh tmp dir; kwargs go to ``SshdCluster``."""
        require_sshd()
        cluster = SshdCluster(tmp_path_factory.mktemp("sshd"), **kwargs)
        clusters.append(cluster)
        cluster.start(n)
        return cluster

    def teardown() -> None:
        errors = []
        for cluster in reversed(clusters):
            try:
                cluster.stop_all()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors:
            raise errors[0]

    return start, teardown


@pytest.fixture
def sshd_cluster(tmp_path_factory):
    """Factory: ``cluster = sshd_cluster(n=3, **SshdCluster kwargs)``.  Every
    cluster it started is stopped (by pid) at the end of the test."""
    start, teardown = _cluster_factory(tmp_path_factory)
    yield start
    teardown()


@pytest.fixture(scope="module")
def sshd_cluster_module(tmp_path_factory):
    """Module-scoped variant of ``sshd_cluster`` (shared hosts; tests must not
    leave them stopped or frozen)."""
    start, teardown = _cluster_factory(tmp_path_factory)
    yield start
    teardown()


# --- fleets on the sshd hosts (helpers in sshfleet.py beside this file) -------------------------------

@pytest.fixture
def ssh_fleet(sshd_cluster, tmp_path):
    """Factory: ``fl = ssh_fleet(n=3, connect_timeout=.., command_timeout=..)`` starts ``n`` sshd hosts
    and returns an empty ``sshfleet.SshFleet`` on them. At teardown (before the daemons stop) every
    process whose command line mentions a workdir root or the fleet dir is SIGKILLed, and the test
    fails if any survives."""
    from sshfleet import SshFleet, processes

    from tests.support import node_problem
    problem = node_problem("/usr/local/bin:/usr/bin:/bin")
    if problem is not None:
        if sshd_required_by_env():
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    made: list = []

    def make(n: int = 3, cluster_kwargs: dict | None = None, **kwargs) -> "SshFleet":
        cluster = sshd_cluster(n, **(cluster_kwargs or {}))
        fl = SshFleet(cluster, tmp_path / f"fleet-{len(made)}", **kwargs)
        made.append(fl)
        return fl

    yield make
    left = []
    for fl in made:
        left += fl.reap()
        left += processes(fl.markers)
    assert not left, "processes survived the teardown: " + "; ".join(f"{p.pid} {p.cmdline}" for p in left)
