"""Bad paths given to the real CLI: every command fails with a clear message and exit 1, never hangs,
never shows a traceback, and creates or changes nothing by mistake.

Each case runs `python -m quantlab` in a subprocess with a deadline (`DEADLINE`): a command still
running then is a hang, and the test fails saying so with what it printed. The cases cover a missing
or empty fleet directory (cron's working directory), plan files that are not plan files, a state
file or events log that is not a regular file, `init` where no fleet can go, and fleet directories
with entries that cannot be read.

Permissions: root is not stopped by permission bits. The cases about permissions run the CLI as
root without the capabilities that ignore them (harness.drop_permission_overrides).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

import pytest
import yaml

from harness import FleetDir, Result, check, permission_problem, ql, runner_counts
from tests.support import require

BIG_PLAN_BYTES = 70 * 1024 * 1024


def assert_fails_cleanly(result: Result, *fragments: str) -> None:
    """Exit 1, no traceback, and every fragment somewhere in what the command printed."""
    check(result, 1, *fragments)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` (not following symlinks) with its mode and size: a before/after picture."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = path.lstat()
            found[str(path.relative_to(root))] = (info.st_mode, info.st_size if stat.S_ISREG(info.st_mode) else 0)
    return found


def kind_of(path: Path) -> str:
    mode = path.lstat().st_mode
    return next(name for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"),
                                        (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "char-device"))
                if test(mode))


@pytest.fixture(scope="module")
def permission_bits_bind(tmp_path_factory) -> None:
    """Skip (fail under CI) unless `ql(..., unprivileged=True)` really runs where permission bits
    stop it."""
    require(permission_problem(tmp_path_factory.mktemp("closed")))


def quiet_fleet(root: Path) -> FleetDir:
    """A valid fleet with one `local` worker and no strategies: nothing to start."""
    return FleetDir(root).worker("w1").write()


# --- 1. no fleet where cron runs -------------------------------------------------------------------

WRITING_COMMANDS = [("reconcile", "--once"), ("apply", "--yes")]
WRITING_IDS = ["reconcile-once", "apply-yes"]


@pytest.mark.parametrize("command", WRITING_COMMANDS, ids=WRITING_IDS)
def test_no_fleet_in_the_working_directory_is_said_and_nothing_is_created(tmp_path, command):
    cron_home = tmp_path / "cron-home"            # cron's working directory: no ./fleet, no --fleet
    cron_home.mkdir()
    result = ql(*command, cwd=cron_home)
    assert_fails_cleanly(result, "not found", "--fleet DIR")
    assert "fleet:" in result.output or str(cron_home / "fleet") in result.output, \
        f"the message does not name the missing fleet directory\n{result.describe()}"
    assert sorted(os.listdir(cron_home)) == [], "something was created in the working directory"


def test_version_needs_no_fleet(tmp_path):
    from importlib.metadata import version
    result = ql("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, f"quantlab {version('quantlab')}"), result.describe()
    assert os.listdir(tmp_path) == []


def test_help_shows_no_value_placeholder_on_flags(tmp_path):
    commands = ["validate", "plan", "apply", "status", "reconcile", "logs", "events", "init"]
    for command in [[], *([c] for c in commands)]:
        shown = ql(*command, "--help", cwd=tmp_path)
        assert shown.returncode == 0, shown.describe()
        assert "<bool>" not in shown.stdout and "list[str]" not in shown.stdout, shown.describe()
    assert "--target ID" in ql("apply", "--help", cwd=tmp_path).stdout


@pytest.mark.parametrize("command", WRITING_COMMANDS, ids=WRITING_IDS)
def test_a_folder_without_fleet_files_is_said_and_gets_no_state(tmp_path, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = ql(*command, "--fleet", empty)
    assert_fails_cleanly(result, str(empty), "*.yaml", "quantlab init")
    assert sorted(os.listdir(empty)) == [], "something (a .quantlab/ state?) was created in the empty folder"


# --- 2. plan files that are not plan files ---------------------------------------------------------

def _fifo(path: Path) -> Path:
    os.mkfifo(path)               # nobody ever writes to it: a blocking open would wait for ever
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _over_the_cap(path: Path) -> Path:
    with open(path, "wb") as handle:  # sparse: 70 MiB of size, no 70 MiB of disk
        handle.truncate(BIG_PLAN_BYTES)
    return path


def _invalid_json(path: Path) -> Path:
    path.write_text('{"formatVersion": 1, "actions": [\n')
    return path


PLAN_FILES: list[tuple[Callable[[Path], Path], str]] = [
    (_fifo, "FIFO"),
    (lambda _: Path("/dev/zero"), "character device"),
    (_folder, "directory"),
    (_over_the_cap, "MiB"),
    (_invalid_json, "not a quantlab plan file"),
]
PLAN_IDS = ["fifo", "dev-zero", "directory", "70-MiB", "invalid-json"]


@pytest.mark.parametrize("make,says", PLAN_FILES, ids=PLAN_IDS)
def test_apply_refuses_a_plan_file_that_is_not_one_at_once(reaper, tmp_path, make, says):
    fleet = quiet_fleet(tmp_path / "fleet")
    planfile = make(tmp_path / "plan.json")
    kind = kind_of(planfile)
    before = tree(fleet.root)
    result = ql("apply", planfile, "--yes", "--fleet", fleet.root)
    assert_fails_cleanly(result, str(planfile), says)
    assert kind_of(planfile) == kind
    assert tree(fleet.root) == before, "apply changed the fleet directory (or started a state) for a bad plan file"


# --- 3. a state file (or events log) that is not a regular file -----------------------------------

def _state_fifo(fleet: FleetDir, tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    fleet.state_path.parent.mkdir(parents=True)
    os.mkfifo(fleet.state_path)
    return fleet.state_path, ()


def _state_folder(fleet: FleetDir, tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    fleet.state_path.mkdir(parents=True)
    return fleet.state_path, ()


def _state_dev_null(fleet: FleetDir, tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    # `--state /dev/null`, with a stand-in made like /dev/null (char device 1,3, mode 0666) in a
    # folder of its own, so that a run that writes beside its state file cannot litter /dev.
    devices = tmp_path / "dev"
    devices.mkdir()
    null = devices / "null"
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device needs root (CAP_MKNOD)")
    null.chmod(0o666)                          # past the umask, as /dev/null is
    return null, ("--state", str(null))


STATE_KINDS = [_state_fifo, _state_folder, _state_dev_null]
STATE_KIND_IDS = ["fifo", "directory", "dev-null"]
STATE_COMMANDS = [("status",), ("plan",), ("apply", "--yes"), ("reconcile", "--once"), ("events",)]
STATE_COMMAND_IDS = ["status", "plan", "apply-yes", "reconcile-once", "events"]


@pytest.mark.parametrize("command", STATE_COMMANDS, ids=STATE_COMMAND_IDS)
@pytest.mark.parametrize("make", STATE_KINDS, ids=STATE_KIND_IDS)
def test_a_state_file_that_is_not_a_regular_file_is_refused(fleet, tmp_path, make, command):
    fleet.worker("w1").strategy("s1").write()         # something apply would start
    state, state_args = make(fleet, tmp_path)
    kind = kind_of(state)
    beside = sorted(os.listdir(state.parent))
    result = ql(*command, "--fleet", fleet.root, *state_args)
    assert_fails_cleanly(result, str(state), "not a regular file")
    assert "chmod" not in result.output, f"advice to chmod something that is not a state file\n{result.describe()}"
    assert kind_of(state) == kind
    assert not runner_counts(fleet.marker), "a strategy was started although the state cannot be read"
    # Nothing new beside a state file given by --state; quantlab's own folder may get its lock file.
    allowed = set(beside) | ({state.name + ".lock"} if not state_args else set())
    now_beside = set(os.listdir(state.parent))
    assert now_beside <= allowed, f"created beside the state file: {sorted(now_beside - allowed)}"


@pytest.mark.parametrize("command", ["status", "plan", "events"])
def test_dev_null_itself_as_the_state_file_is_refused(reaper, tmp_path, command):
    fleet = quiet_fleet(tmp_path / "fleet")
    result = ql(command, "--fleet", fleet.root, "--state", "/dev/null")
    assert_fails_cleanly(result, "/dev/null", "not a regular file")
    assert "chmod" not in result.output, f"advice to chmod /dev/null\n{result.describe()}"
    assert not (fleet.root / ".quantlab").exists()


@pytest.mark.parametrize("command", [("events",), ("apply", "--yes"), ("reconcile", "--once")],
                         ids=["events", "apply-yes", "reconcile-once"])
def test_an_events_log_that_is_a_fifo_is_refused_without_hanging(fleet, command):
    fleet.worker("w1").strategy("s1").write()          # apply and reconcile have a start to record
    events_log = fleet.state_path.with_name("events.jsonl")
    events_log.parent.mkdir(parents=True)
    os.mkfifo(events_log)
    result = ql(*command, "--fleet", fleet.root)
    assert_fails_cleanly(result, str(events_log))
    assert kind_of(events_log) == "fifo"


# --- 4. init where no fleet can go -----------------------------------------------------------------

def _under_a_file(workspace: Path) -> Path:
    (workspace / "some_file").write_text("not a folder\n")
    return workspace / "some_file" / "fleet"


def _non_empty_folder(workspace: Path) -> Path:
    (workspace / "taken").mkdir()
    (workspace / "taken" / "notes.txt").write_text("mine\n")
    return workspace / "taken"


def _read_only_parent(workspace: Path) -> Path:
    parent = workspace / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    return parent / "fleet"


def _existing_file(workspace: Path) -> Path:
    (workspace / "fleet").write_text("a file\n")
    return workspace / "fleet"


INIT_TARGETS = [(_under_a_file, False), (_non_empty_folder, False), (_read_only_parent, True),
                (_existing_file, False)]
INIT_IDS = ["under-a-regular-file", "non-empty-folder", "read-only-parent", "regular-file"]


@pytest.mark.parametrize("make,unprivileged", INIT_TARGETS, ids=INIT_IDS)
def test_init_where_no_fleet_can_go_says_so_in_one_line(request, tmp_path, make, unprivileged):
    if unprivileged:
        request.getfixturevalue("permission_bits_bind")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    target = make(workspace)
    before = tree(workspace)
    result = ql("init", target, unprivileged=unprivileged)
    assert_fails_cleanly(result, str(target))
    assert len(result.output.strip().splitlines()) == 1, f"expected one line\n{result.describe()}"
    assert tree(workspace) == before, "init created or changed something"


# --- 5. a fleet directory nobody may read ----------------------------------------------------------

@pytest.mark.parametrize("command", [("validate",), ("plan",), ("status",), ("apply", "--yes"),
                                     ("reconcile", "--once")],
                         ids=["validate", "plan", "status", "apply-yes", "reconcile-once"])
def test_an_unreadable_fleet_directory_is_named(permission_bits_bind, reaper, tmp_path, command):
    fleet = quiet_fleet(tmp_path / "fleet")
    before = tree(fleet.root)
    fleet.root.chmod(0o000)
    try:
        result = ql(*command, "--fleet", fleet.root, unprivileged=True)
    finally:
        fleet.root.chmod(0o755)
    assert_fails_cleanly(result, str(fleet.root), "Permission denied")
    assert tree(fleet.root) == before


# --- 6. strange entries in a fleet that runs -------------------------------------------------------

def test_a_fifo_and_an_unreadable_folder_change_nothing_on_the_hosts(permission_bits_bind, fleet):
    # s1 is defined in a sub-folder that then becomes unreadable: skipping that folder would read
    # as "s1 was removed" and stop it. A 2 s probe deadline (the interval): met on a busy machine too.
    fleet.settings["reconcile"]["intervalSeconds"] = 2.0
    fleet.worker("w1").strategy("s1")
    more = fleet.root / "more"
    more.mkdir()
    (more / "s1.yaml").write_text(yaml.safe_dump(fleet.strategies.pop("s1"), sort_keys=False))
    fleet.write()
    fleet.apply()
    fleet.beating("s1")
    runner, supervisor = fleet.runner_pid("s1"), fleet.supervisor_pid("s1")
    epoch = fleet.placement("s1")["epoch"]

    fifo = fleet.root / "x.yaml"
    os.mkfifo(fifo)
    more.chmod(0o000)
    try:
        validated = ql("validate", "--fleet", fleet.root, unprivileged=True)
        applied = ql("apply", "--yes", "--fleet", fleet.root, unprivileged=True)
        reconciled = ql("reconcile", "--once", "--fleet", fleet.root, unprivileged=True)
    finally:
        more.chmod(0o755)
    for result in (validated, applied, reconciled):
        assert_fails_cleanly(result, str(fifo), str(more))
    assert "nothing was changed" in applied.output, applied.describe()

    assert fleet.runner_pid("s1") == runner, "s1's runner was stopped or replaced"
    assert fleet.supervisor_pid("s1") == supervisor
    assert fleet.placement("s1")["epoch"] == epoch
    fleet.beating("s1")
    assert fleet.runner_pid("s1") == runner
    assert runner_counts(fleet.marker) == {"s1": 1}
    assert kind_of(fifo) == "fifo"
