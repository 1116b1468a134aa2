"""The hostile-input corpus: its cases as data, and the one way every case is set up, run and judged.

A case (`Case`) names its category and id, what it sets up — files written over a prepared world
(the fleet's files, the state file, a saved plan, files in a worker's folder) — the command, the
exit code, and the words the answer must hold: the file and line, or the host or thing, and what to
do. The world (`World`, made once per test module by `prepare`) is a valid fleet of two
`host: local` workers whose folders (`hosts/w1`, `hosts/w2`) already hold the agent, a state file
written by a real `apply` with nothing to start, and a plan saved from it that would start s1.
Every case runs on a copy of it, so no case sees another's leftovers.

`play` runs a case and then checks, whatever the command was:
- it ended within DEADLINE, without a traceback, with the exit code and the words expected;
- nothing on the hosts changed (every path, its mode, size and mtime: `tree`) and no process runs
  there (a supervisor's or runner's command line names its folder);
- the state file is as it was (`keeps`: the bytes, or what runs where for commands that renew).

Commands run in this process, through typer's CliRunner on quantlab.face.cli.app, on a thread with the
deadline: a few milliseconds each instead of an interpreter's start. A case with a file nobody may
read runs `python -m quantlab` as root without the capabilities that ignore permission bits
(harness.ql(unprivileged=True)), since this process cannot drop them and get them back.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import pytest
from typer.testing import CliRunner

from tests.integration.harness import DEADLINE, PYTHON, Result, check, kill_all, processes, ql, tree

# --- the world ---------------------------------------------------------------------------------------

FLEET_YAML = """\
apiVersion: quantlab/v1
kind: Fleet
policy: load-based
reconcile: {intervalSeconds: 5}
monitor: {leaseTtlSeconds: 300}
"""

# Relative workdirs (resolved against the fleet directory): the fleet's files, and so its hash and
# the plan saved from it, are the same in every copy of the world.
WORKERS_YAML = """\
apiVersion: quantlab/v1
kind: Worker
id: w1
host: local
workdir: ../hosts/w1
capabilities: {maxStrategies: 4, supportedApis: [paper]}
---
apiVersion: quantlab/v1
kind: Worker
id: w2
host: local
workdir: ../hosts/w2
capabilities: {maxStrategies: 4, supportedApis: [paper]}
"""

# s1 wants to run and runs nowhere: a command that acted by mistake would start it.
STRATEGIES_YAML = """\
apiVersion: quantlab/v1
kind: Strategy
id: s1
strategyFile: strategies/s1.mjs
params: {symbol: BTCUSDT}
requirements: {api: paper}
---
apiVersion: quantlab/v1
kind: Strategy
id: s2
strategyFile: strategies/s2.mjs
desiredState: stopped
requirements: {api: paper}
"""

JS = "export async function st_init(ctx) {}\nexport async function st_heartbeat(ctx) {}\nexport async function st_exit(ctx) {}\n"

BASE_FILES = {"fleet/fleet.yaml": FLEET_YAML, "fleet/workers.yaml": WORKERS_YAML,
              "fleet/strategies.yaml": STRATEGIES_YAML, "fleet/strategies/s1.mjs": JS, "fleet/strategies/s2.mjs": JS}


# --- what a case writes --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    """A symbolic link to `target` (placeholders filled in)."""
    target: str


@dataclass(frozen=True)
class Sparse:
    """A file of `size` bytes that takes no room on disk."""
    size: int


@dataclass(frozen=True)
class Unreadable:
    """A file with this text that nobody may read (mode 000)."""
    text: str


@dataclass(frozen=True)
class Edit:
    """A change to the JSON the file holds: `change(value)` changes it in place, or returns the new value."""
    change: Callable[[Any], Any]


class _Kind:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


FIFO = _Kind("FIFO")           # a named pipe nobody writes to: a blocking open would wait for ever
FOLDER = _Kind("FOLDER")       # an empty folder where a file is expected

Content = Union[str, bytes, Link, Sparse, Unreadable, Edit, _Kind]
Said = Union[str, tuple[str, ...]]


def js(value: Any) -> str:
    return json.dumps(value)


# --- a case ------------------------------------------------------------------------------------------

KEEPS = ("state", "placements")


@dataclass(frozen=True)
class Case:
    """One hostile input. `run`: the CLI arguments; `--fleet` and `--state` of the world are added
    unless they are given (`validate` takes no --state). `says`: fragments of what it printed, with
    {world}, {fleet}, {hosts} and {state} filled in; a tuple's fragments must all be on one line.
    `setup`: path (below the world) -> content, written before the command; `then`: one more step
    (a git commit, say). `keeps`: "state" — the state file's bytes and mtime; "placements" — what
    runs where (placements, lineage, suspensions), for commands that renew leases by design.
    `raw`: the arguments as they are. `xfail`: a known bug this case shows (strict: it fails until
    fixed)."""

    category: str
    id: str
    run: tuple[str, ...]
    code: int
    says: tuple[Said, ...]
    setup: Mapping[str, Content] = field(default_factory=dict)
    then: Callable[["World"], None] | None = None
    keeps: str = "state"
    raw: bool = False
    xfail: str | None = None

    def __post_init__(self) -> None:
        assert self.keeps in KEEPS, self.keeps

    def param(self) -> Any:
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        return pytest.param(self, id=self.id, marks=marks)


def cases_of(category: str) -> Callable[..., Case]:
    """`case = cases_of("fleet")`, then `case(id, run, code, says, **more)` for each row of a table."""
    def case(id: str, run: tuple[str, ...] | list[str], code: int, says: tuple[Said, ...] | list[Said] | Said,
             **more: Any) -> Case:
        return Case(category, id, tuple(run), code, (says,) if isinstance(says, str) else tuple(says), **more)
    return case


def params(cases: list[Case]) -> list[Any]:
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), f"ids repeat: {sorted(i for i in ids if ids.count(i) > 1)}"
    return [c.param() for c in cases]


# --- the world, on disk -----------------------------------------------------------------------------------

class World:
    """A folder with fleet/, hosts/w1, hosts/w2, state.json and plan.json (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def fleet(self) -> Path:
        return self.root / "fleet"

    @property
    def hosts(self) -> Path:
        return self.root / "hosts"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def marker(self) -> str:
        """What the command line of every process started on the hosts holds."""
        return str(self.hosts) + os.sep

    def fill(self, text: str) -> str:
        for name in ("world", "fleet", "hosts", "state"):
            text = text.replace("{" + name + "}", str(self.root if name == "world" else getattr(self, name)))
        return text

    def write(self, rel: str, content: Content) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Edit):
            value = json.loads(path.read_text())
            changed = content.change(value)
            content = json.dumps(value if changed is None else changed)
        if path.is_symlink() or path.exists():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if content is FIFO:
            os.mkfifo(path)
        elif content is FOLDER:
            path.mkdir()
        elif isinstance(content, Link):
            path.symlink_to(self.fill(content.target))
        elif isinstance(content, Sparse):
            with open(path, "wb") as handle:
                handle.truncate(content.size)
        elif isinstance(content, Unreadable):
            path.write_text(self.fill(content.text))
            path.chmod(0o000)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(self.fill(content))
        if path.name == "state.json" and path.is_file() and not path.is_symlink() and not isinstance(content, Unreadable):
            path.chmod(0o600)           # a state file others may write is refused (that is a case of its own)

    def copy(self, dest: Path) -> "World":
        """A copy of this world at `dest`, its paths (workdirs, the state's addresses) made its own."""
        shutil.copytree(self.root, dest, symlinks=True)
        world = World(dest)
        for path in [*dest.glob("*.json*"), *dest.glob("fleet/*.yaml")]:
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                if str(self.root).encode() in data:
                    path.write_bytes(data.replace(str(self.root).encode(), str(dest).encode()))
        return world

    def args(self, case: Case) -> list[str]:
        args = [self.fill(a) for a in case.run]
        if case.raw or args[0] == "init":
            return args
        if "--fleet" not in args:
            args += ["--fleet", str(self.fleet)]
        if "--state" not in args and args[0] != "validate":
            args += ["--state", str(self.state)]
        return args

    # --- what must not change ---

    def look(self) -> dict[str, Any]:
        return {"hosts": tree(self.hosts), "state": file_picture(self.state), "placements": _placements(self.state)}

    def unchanged(self, before: dict[str, Any], keeps: str, shown: str) -> None:
        after = self.look()
        moved = sorted(set(before["hosts"].items()) ^ set(after["hosts"].items()))
        assert not moved, f"something changed on the hosts: {moved}\n{shown}"
        running = processes(self.marker)
        assert not running, "processes run on the hosts: " + "; ".join(p.cmdline for p in running) + f"\n{shown}"
        if keeps == "state":
            assert after["state"] == before["state"], f"the state file changed\n{shown}"
        elif keeps == "placements":
            assert after["placements"] == before["placements"], f"what runs where changed in the state\n{shown}"


def file_picture(path: Path) -> tuple[Any, ...] | None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    data = path.read_bytes() if stat.S_ISREG(info.st_mode) and info.st_mode & 0o400 and info.st_size < 2**20 else b""
    return info.st_mode, info.st_size, info.st_mtime_ns, data


def _placements(path: Path) -> Any:
    """What runs where as the state says it (for commands that renew leases, which rewrite the file).
    Not the next epoch: a start that failed used one up, and epochs are never given out twice."""
    try:
        value = json.loads(path.read_bytes()) if path.is_file() and path.stat().st_size < 2**20 else None
    except (OSError, ValueError, RecursionError):
        return "unreadable"
    if not isinstance(value, dict):
        return value
    return {k: value.get(k) for k in ("lineage", "placements", "suspended", "migratedTo")}


def prepare(root: Path, extra: Mapping[str, Content] | None = None,
            then: Callable[[World], None] | None = None) -> World:
    """The world (see the module docstring), with `extra` written over it, then `then` run."""
    world = World(root)
    for rel, text in BASE_FILES.items():
        world.write(rel, text)
    for worker in ("w1", "w2"):
        (world.hosts / worker).mkdir(parents=True)
    # A state written by a real apply, with s1 held back so that nothing starts, and a plan saved from it.
    world.write("fleet/strategies.yaml", STRATEGIES_YAML.replace("id: s1\n", "id: s1\ndesiredState: stopped\n"))
    applied = invoke(["apply", "--yes", "--fleet", str(world.fleet), "--state", str(world.state)])
    check(applied, 0, "No changes.")
    world.write("fleet/strategies.yaml", STRATEGIES_YAML)
    planned = invoke(["plan", "--fleet", str(world.fleet), "--state", str(world.state), "--out", str(world.plan)])
    check(planned, 0, "start   s1")
    for rel, content in (extra or {}).items():
        world.write(rel, content)
    if then is not None:
        then(world)
    assert not processes(world.marker), "preparing the world started something"
    return world


# --- running the CLI ---------------------------------------------------------------------------------------

_runner = CliRunner()


def invoke(args: list[str], timeout: float = DEADLINE) -> Result:
    """quantlab ARGS in this process; a command still running after `timeout` fails the test as hung.
    An exception that escaped is printed as the real command would print it (a traceback)."""
    from quantlab.face.cli import app

    env = {name: None for name in os.environ if name.startswith("QUANTLAB_")}
    done: dict[str, Any] = {}

    def call() -> None:
        done["result"] = _runner.invoke(app, args, env=env)

    started = time.monotonic()
    thread = threading.Thread(target=call, name="quantlab-cli", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"$ quantlab {' '.join(args)}\nhung: still running after {timeout:g}s")
    answer = done["result"]
    stderr = answer.stderr
    if answer.exception is not None and not isinstance(answer.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*answer.exc_info))
    return Result([PYTHON, "-m", "quantlab", *args], answer.exit_code, answer.stdout, stderr,
                  time.monotonic() - started)


def judge(result: Result, code: int, says: tuple[Said, ...], world: World) -> None:
    """The exit code, no traceback, and every fragment (a tuple's on one line) in what it printed."""
    check(result, code, *[world.fill(s) for s in says if isinstance(s, str)])
    lines = result.output.splitlines()
    for together in (s for s in says if isinstance(s, tuple)):
        wanted = [world.fill(s) for s in together]
        assert any(all(w in line for w in wanted) for line in lines), \
            f"expected {wanted!r} on one line\n{result.describe()}"


def play(case: Case, template: World, tmp_path: Path, request: pytest.FixtureRequest) -> Result:
    """Run `case` on a copy of `template` and judge it (see the module docstring)."""
    world = template.copy(tmp_path / "world")
    for rel, content in case.setup.items():
        world.write(rel, content)
    if case.then is not None:
        case.then(world)
    closed = [p for p in world.root.rglob("*") if not p.is_symlink() and stat.S_IMODE(p.lstat().st_mode) == 0]
    if closed:
        request.getfixturevalue("permission_bits_bind")
    before = world.look()
    try:
        args = world.args(case)
        result = ql(*args, unprivileged=True) if closed else invoke(args)
        judge(result, case.code, case.says, world)
        world.unchanged(before, case.keeps, result.describe())
        return result
    finally:
        kill_all(world.marker)          # whatever a failing case started ends with it
        for path in closed:
            path.chmod(0o600)
