"""Parts of the host agent on their own, with a fake clock: the health watch and the restart
backoff; and the protocol's vocabulary, which the controller reads."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "quantlab" / "host" / "agent"))

from qlagent import protocol  # noqa: E402
from qlagent.health import HealthWatch  # noqa: E402
from qlagent.supervisor import restart_delay  # noqa: E402

from quantlab.core.observed import KNOWN_STATUSES  # noqa: E402


class FakeSupervisor:
    """What the health watch reads of its supervisor."""

    def __init__(self, folder: Path, heartbeat_s: float = 1.0, **sched: Any):
        self.folder, self.heartbeat_s = folder, heartbeat_s
        self.sched = {"initTimeoutSeconds": 5, "maxErrors": 2, **sched}
        self.paused = False
        self.status: dict[str, Any] = {"state": "starting", "restarts": 0}
        self.problems: list[str] = []

    def path(self, name: str) -> str:
        return str(self.folder / name)

    def note_problem(self, problem: str) -> None:
        self.problems.append(problem)

    def save_status(self, **fields: Any) -> None:
        self.status.update(fields)

    def event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def beat(self, beats: int, errors: int = 0) -> None:
        (self.folder / "heartbeat.json").write_text(json.dumps(
            {"t": 1, "beats": beats, "errorCount": errors, "lastError": "boom" if errors else None, "paused": False}))


def test_no_first_heartbeat_within_init_timeout(tmp_path):
    sup = FakeSupervisor(tmp_path)
    watch = HealthWatch(sup, started=100.0, restarts=0)
    assert watch.check(now=104.9) is None
    assert "st_init did not finish within 5s" in watch.check(now=105.1)


def test_a_silent_runner_is_unhealthy_after_three_heartbeats(tmp_path):
    sup = FakeSupervisor(tmp_path, heartbeat_s=1.0)
    watch = HealthWatch(sup, started=100.0, restarts=0)
    sup.beat(1)
    assert watch.check(now=101.0) is None and sup.status["state"] == "running"
    assert watch.check(now=103.9) is None
    assert "no heartbeat for 3.1s" in watch.check(now=104.1)


def test_a_silent_runner_on_a_full_disk_is_not_restarted_for_it(tmp_path, monkeypatch):
    import qlagent.health
    free = {"bytes": 100 * 1024}
    monkeypatch.setattr(qlagent.health, "disk_free_bytes", lambda path: free["bytes"])
    sup = FakeSupervisor(tmp_path, heartbeat_s=1.0)
    watch = HealthWatch(sup, started=100.0, restarts=0)
    sup.beat(1)
    assert watch.check(now=101.0) is None
    assert watch.check(now=110.0) is None, "a heartbeat the disk would not take cost a restart"
    assert any("disk is full" in p for p in sup.problems)
    # Space again: the runner gets three heartbeats to show it lives, then is judged as always.
    free["bytes"] = 10 * 2 ** 30
    assert watch.check(now=112.9) is None
    assert "no heartbeat" in watch.check(now=113.1)


def test_too_many_errors_and_a_garbage_heartbeat(tmp_path):
    sup = FakeSupervisor(tmp_path)
    watch = HealthWatch(sup, started=100.0, restarts=0)
    sup.beat(1, errors=3)
    assert "errorCount 3 > maxErrors 2" in watch.check(now=101.0)
    (tmp_path / "heartbeat.json").write_text('{"t": "yesterday"}')
    assert watch.check(now=102.0) is None and sup.problems, "a bad file is noted, and counts as no heartbeat"
    assert "no valid heartbeat" in watch.check(now=105.5)


@pytest.mark.parametrize("restarts, jitter, delay", [(1, 1.0, 1.0), (3, 1.0, 4.0), (3, 0.5, 2.0), (20, 1.0, 600.0)])
def test_restart_backoff_doubles_with_jitter_up_to_ten_minutes(restarts, jitter, delay):
    assert restart_delay({"restartDelay": 1000}, restarts, jitter) == pytest.approx(delay)


def test_the_controller_knows_every_status_the_agent_reports():
    assert KNOWN_STATUSES == frozenset(protocol.INSTANCE_STATUSES)
    assert set(protocol.FINAL_STATES) <= set(protocol.SUPERVISOR_STATES)


def test_the_agent_answers_on_a_python_without_ctypes_or_zlib(tmp_path):
    """Pythons built without libffi or zlib exist on hosts: the agent still probes (no prctl
    containment, no checkpoint copies) instead of failing every command at import."""
    import subprocess

    from quantlab.edges.hosts import agent_zipapp

    app = tmp_path / "agent.pyz"
    app.write_bytes(agent_zipapp())
    run = ("import runpy, sys; sys.modules['ctypes'] = None; sys.modules['zlib'] = None; "
           f"sys.argv = [{str(app)!r}, 'probe']; runpy.run_path({str(app)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", run], input=b"{}", capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["host"]["cpus"] >= 1


def test_the_shipped_agent_brings_its_bytecode_and_a_probe_loads_only_what_it_needs(tmp_path):
    """zipimport never writes bytecode, so without the .pyc files in the zip a host would compile
    the agent on every call; and a probe (every host, every round) imports no supervisor, log reader
    or start and stop code. The agent is still named by its sources alone."""
    import hashlib
    import subprocess
    import textwrap
    import zipfile

    from quantlab.edges.hosts import AGENT_HASH, AGENT_SOURCES, _zip, agent_zipapp

    app = tmp_path / "agent.pyz"
    app.write_bytes(agent_zipapp())
    names = zipfile.ZipFile(app).namelist()
    assert {n + "c" for n, _ in AGENT_SOURCES} <= set(names), names
    assert AGENT_HASH == hashlib.sha256(_zip(AGENT_SOURCES)).hexdigest()[:16]
    script = textwrap.dedent(f"""
        import json, runpy, sys
        sys.argv = [{str(app)!r}, "probe"]
        try:
            runpy.run_path({str(app)!r}, run_name="__main__")
        except SystemExit:
            pass
        probe = sys.modules["qlagent.probe"]
        print(json.dumps({{"modules": sorted(m for m in sys.modules if m.startswith("qlagent") or m == "subprocess"),
                           "compiled_as": probe.probe.__code__.co_filename}}), file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], input=b"{}", capture_output=True, timeout=30)
    assert json.loads(done.stdout)["host"]["cpus"] >= 1, done.stderr.decode()
    seen = json.loads(done.stderr.decode().strip().splitlines()[-1])
    # Loaded from the shipped bytecode (compiled as "qlagent/probe.py"), not compiled from the zip's source.
    assert seen["compiled_as"] == "qlagent/probe.py", seen
    assert not {"qlagent.supervisor", "qlagent.control", "qlagent.logs", "qlagent.output"} & set(seen["modules"]), seen
    assert "subprocess" not in seen["modules"], "a probe that needs no program's version imports no subprocess"
