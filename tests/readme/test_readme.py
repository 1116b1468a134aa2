"""The README, typed as written: its commands run literally, from the root of a fresh clone, and
every exit code it promises is asserted.

- The Quick start's first command (the venv, the install, the loop on the example fleet) runs as
  printed; every example strategy must then run. The other `sh` blocks follow line by line as
  printed (status, logs -f for a few seconds, serve with one request, the background loop and its
  stop). A block marked `<!-- readme-test: skip (why) -->` is not run (`.ci/run` is CI itself).
- Every command of the Commands table must exist and accept the options it shows, and every exit
  code its row promises is produced by a scenario below (or by the named test elsewhere, for the
  few that need a PostgreSQL server or a strategy in error) — a promise without a scenario fails.

The clone is this repository's files as they would be committed (tracked and untracked, not
ignored). pip installs from the wheelhouse `.ci/run` builds (`.venv/wheelhouse`) with no index, so
no test traffic leaves this machine; the command typed is the README's, unchanged.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.support import alive, kill_all, require, wait_for

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
WHEELHOUSE = REPO / ".venv" / "wheelhouse"
EXAMPLE_STRATEGIES = {"grid-btc-sub1", "grid-eth-sub2", "mart-sol-02", "trend-eth-01", "trend-btc-eu"}
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b")


# --- what the README says ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    lines: tuple[str, ...]
    skipped: bool


def sh_blocks(text: str) -> list[Block]:
    """Every ```sh block, in order, and whether the line before its fence marks it as not run."""
    blocks, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "```sh":
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        body = tuple(raw.strip() for raw in lines[i + 1:end] if raw.strip())
        before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        blocks.append(Block(body, bool(SKIP.search(before))))
    return blocks


@dataclass(frozen=True)
class Row:
    synopses: tuple[str, ...]     # "quantlab plan [--out FILE] …", one per command the row shows
    codes: frozenset[int]         # every exit code the row promises

    @property
    def key(self) -> str:
        return command_words(self.synopses[0])


def command_words(synopsis: str) -> str:
    """"quantlab state push FILE|DSN" -> "state push": the subcommand's words."""
    words = []
    for word in synopsis.split()[1:]:
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        words.append(word)
    return " ".join(words)


def command_rows(text: str) -> list[Row]:
    section = text.split("## Commands", 1)[1]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `quantlab"):
            if rows and not line.startswith("|"):
                break
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        synopses = tuple(s.replace("\\|", "|") for s in re.findall(r"`(quantlab [^`]*)`", cells[0]))
        rows.append(Row(synopses, frozenset(int(c) for c in re.findall(r"\b(\d)\b", cells[2]))))
    return rows


# --- the clone ----------------------------------------------------------------------------------------

@dataclass
class Clone:
    root: Path
    scratch: Path              # beside the clone: copies of the example fleet for the scenarios

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QUANTLAB_", "PIP_", "VIRTUAL_ENV"))}
        # The clone's venv first, as after `source .venv/bin/activate`; pip offline, from the wheelhouse.
        env.update(PATH=f"{self.root / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", PIP_NO_INDEX="1",
                   PIP_FIND_LINKS=str(WHEELHOUSE), PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1")
        return env

    def sh(self, line: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-c", line], cwd=self.root, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, line: str, log: Path) -> subprocess.Popen:
        """A line that runs until interrupted, in its own process group (so Ctrl-C reaches all of it)."""
        with open(log, "ab") as out:
            return subprocess.Popen(["sh", "-c", line], cwd=self.root, env=self.env(), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def ql(self, *args: str, check: int | None = 0, timeout: float = 120.0) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.root / ".venv" / "bin" / "quantlab"), *args], cwd=self.root, env=self.env(),
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check is not None:
            assert done.returncode == check, f"quantlab {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def running(self, fleet: str = "fleet") -> set[str]:
        if not (self.root / ".venv" / "bin" / "quantlab").exists():
            return set()                       # the Quick start is still installing
        done = self.ql("status", "--fleet", fleet, "--output", "json", check=None)
        if done.returncode != 0:
            return set()
        return {s["id"] for s in json.loads(done.stdout)["strategies"] if s["status"] == "running" and s["healthy"]}

    def copy_fleet(self, name: str, edit: Callable[[Path], None] | None = None) -> str:
        """A copy of the example fleet outside the clone (no state of its own yet); its absolute path."""
        dest = self.scratch / name
        shutil.copytree(self.root / "fleet", dest, ignore=shutil.ignore_patterns(".quantlab"))
        if edit is not None:
            edit(dest)
        return str(dest)


def interrupt(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """Ctrl-C, as a terminal sends it: SIGINT to every process of the command's process group (`start`
    made one), except the `sh` running the line (an interactive shell is not in its job's group; `sh
    -c` would die of it). The shell's exit code is then the command's. A command still running after
    `timeout` fails the test with what each process of the group was doing."""
    group = _group(proc.pid)
    assert group, "the command had already ended"
    for pid, name in group.items():
        if name not in ("sh", "dash", "bash") or pid != proc.pid:
            with contextlib.suppress(ProcessLookupError):      # it ended meanwhile (the first signal's doing)
                os.kill(pid, signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        left = {pid: (_read(f"/proc/{pid}/stat").split(b") ")[-1][:1], _read(f"/proc/{pid}/wchan"),
                      _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ")[:200]) for pid in _group(proc.pid)}
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running {timeout:g} s after Ctrl-C (sent to {sorted(group)}): {left}")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _group(pgid: int) -> dict[int, str]:
    """The live processes of process group `pgid`, with their names."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        stat = _read(f"/proc/{entry}/stat")
        name, _, rest = stat.partition(b"(")[2].rpartition(b")")
        fields = rest.split()
        if len(fields) > 3 and fields[0] != b"Z" and int(fields[3]) == pgid:
            found[int(entry)] = name.decode(errors="replace")
    return found


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    require(None if shutil.which("git") else "git is not installed")
    require(None if WHEELHOUSE.is_dir() and any(WHEELHOUSE.glob("*.whl")) else
            f"{WHEELHOUSE} is missing: run .ci/run (it builds the wheels the Quick start installs)")
    base = tmp_path_factory.mktemp("readme")
    root = base / "quantlab"
    subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True, timeout=60, capture_output=True)
    # The working tree as it would be committed: changes not committed yet are part of what is tested.
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True, timeout=60).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source, target = REPO / rel, root / rel
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        elif not source.exists() and target.exists():
            target.unlink()
    scratch = base / "scratch"
    scratch.mkdir()
    yield Clone(root, scratch)
    left = kill_all(str(base) + os.sep)
    assert not left, "processes survived: " + "; ".join(f"{p.pid} {p.cmdline}" for p in left)


# --- the Quick start ------------------------------------------------------------------------------------

LONG_RUNNING = ("reconcile --fleet fleet", " -f", " serve ")


def test_the_quick_start_runs_the_example_fleet_as_written(clone: Clone):
    text = README.read_text()
    blocks = sh_blocks(text)
    # The first two commands: run the example fleet, run the tests (which CI runs).
    quick, tests, *rest = blocks
    assert quick.lines == ("python3 -m venv .venv && .venv/bin/pip install -q -e . && "
                           ".venv/bin/quantlab reconcile --fleet fleet",) and not quick.skipped, quick
    assert tests.lines == (".ci/run",) and tests.skipped
    assert text.index("```sh") < 2500, "the Quick start must be on the README's first screen"

    loop = clone.start(quick.lines[0], clone.scratch / "quick-start.log")
    try:
        wait_for(lambda: clone.running() >= EXAMPLE_STRATEGIES or loop.poll() is not None, 180,
                 what="every example strategy running under the Quick start's loop")
        assert loop.poll() is None, (clone.scratch / "quick-start.log").read_text()[-3000:]
        assert clone.running() == EXAMPLE_STRATEGIES
        for block in rest:
            assert not block.skipped, f"only .ci/run may be skipped: {block}"
            if block.lines[0].startswith("nohup"):
                continue                       # the background loop: after this one has stopped
            for line in block.lines:
                run_line(clone, line)
    finally:
        code = interrupt(loop) if loop.poll() is None else loop.returncode
    assert code == 0, (clone.scratch / "quick-start.log").read_text()[-3000:]
    assert "reconcile loop stopped" in (clone.scratch / "quick-start.log").read_text()

    background = next(b for b in rest if b.lines[0].startswith("nohup"))
    start, stop = background.lines
    started = clone.sh(start)
    assert started.returncode == 0, started.stderr
    pid = int((clone.root / "reconcile.pid").read_text())
    log = clone.root / "reconcile.log"
    wait_for(lambda: "tick" in log.read_text(), 30, what="a round of the background loop")
    assert clone.running() == EXAMPLE_STRATEGIES
    stopped = clone.sh(stop)
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not alive(pid), 30, what="the background loop to exit on SIGTERM")
    assert "reconcile loop stopped" in log.read_text()
    ignored = clone.sh("git status --porcelain --ignored reconcile.log reconcile.pid").stdout
    assert ignored.count("!!") == 2, f"the README's files are not ignored by git: {ignored}"


def run_line(clone: Clone, line: str) -> None:
    """One command of a README block, as printed; the long-running ones are watched, then interrupted."""
    assert line.startswith(".venv/bin/quantlab "), line
    if " -f" in line:                                   # logs -f: lines come, and more follow
        log = clone.scratch / "logs-f.log"
        proc = clone.start(line, log)
        wait_for(lambda: log.read_text().count("\n") >= 3, 20, what=f"output of `{line}`")
        seen = log.read_text().count("\n")
        wait_for(lambda: log.read_text().count("\n") > seen, 20, what=f"`{line}` to follow new lines")
        assert interrupt(proc) == 0, log.read_text()
        return
    if " serve " in line or line.endswith(" serve"):   # the page: one request, then Ctrl-C
        log = clone.scratch / "serve.log"
        proc = clone.start(line, log)
        url = wait_for(lambda: re.search(r"http://127\.0\.0\.1:\d+/", log.read_text()), 20,
                       what="the page's address").group(0)
        assert url == "http://127.0.0.1:8421/", url
        page = _get(url)
        report = json.loads(_get(url + "api/status"))
        assert "<html" in page.lower() and {s["id"] for s in report["strategies"]} >= EXAMPLE_STRATEGIES
        assert interrupt(proc) == 0, log.read_text()
        return
    done = clone.sh(line)
    assert done.returncode == 0, f"{line}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    if " status " in line:
        assert all(sid in done.stdout for sid in EXAMPLE_STRATEGIES), done.stdout


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:     # noqa: S310 - loopback only
        assert answer.status == 200
        return answer.read().decode()


# --- the Commands table ---------------------------------------------------------------------------------

def _typo(fleet: Path) -> None:
    path = fleet / "strategies.yaml"
    path.write_text(path.read_text().replace("heartbeatMs", "heartbeatMS", 1))


# Covered by a test elsewhere (it needs a PostgreSQL server, or a strategy in error).
ELSEWHERE = {
    ("leader show", 0): "tests/pg/test_pg_daemons.py::test_step_down_and_sigterm_hand_the_lead_over_and_nothing_restarts",
    ("leader step-down", 0): "tests/pg/test_pg_daemons.py::test_step_down_and_sigterm_hand_the_lead_over_and_nothing_restarts",
    ("retry", 0): "tests/integration/test_operator_verbs.py::test_retry_starts_a_strategy_in_error_again_while_the_loop_runs",
    # Ctrl-C on the README's own `serve` line, asserted by the Quick start's test above
    ("serve", 0): "tests/readme/test_readme.py::test_the_quick_start_runs_the_example_fleet_as_written",
}


def scenarios(clone: Clone) -> dict[tuple[str, int], list[list[str]]]:
    """(command, exit code) -> the commands that show it, in order (the last one is asserted; those
    before it prepare). All run from the clone's root, `quantlab` on PATH as in an activated venv."""
    broken = clone.copy_fleet("broken", _typo)
    fresh = clone.copy_fleet("fresh")
    pushed = clone.copy_fleet("pushed")
    other = clone.copy_fleet("other")
    new_dir = str(clone.scratch / "new-fleet")
    return {
        ("validate", 0): [["validate"]],
        ("validate", 1): [["validate", "--fleet", broken]],
        ("plan", 0): [["plan"]],
        ("plan", 2): [["plan", "--detailed-exitcode", "--fleet", fresh]],
        ("plan", 1): [["plan", "--target", "nosuch"]],
        ("apply", 0): [["apply", "--yes"]],
        ("apply", 1): [["apply", "--yes", "--target", "nosuch"]],
        ("status", 0): [["status"]],
        ("status", 2): [["status", "--detailed-exitcode", "--fleet", fresh]],
        ("reconcile", 0): [["reconcile", "--once"]],
        ("reconcile", 1): [["reconcile", "--once", "--fleet", broken]],
        ("explain", 0): [["explain", "grid-btc-sub1"]],
        ("explain", 1): [["explain", "nosuch"]],
        ("suspend", 0): [["suspend", "--target", "grid-btc-sub1", "--reason", "readme"]],
        ("suspend", 1): [["suspend", "--target", "nosuch"]],
        ("resume", 0): [["resume", "--target", "grid-btc-sub1"]],
        ("resume", 1): [["resume", "--target", "nosuch"]],
        ("stop-all", 0): [["stop-all", "--yes", "--reason", "readme", "--fleet", other]],
        ("stop-all", 1): [["stop-all"]],
        ("retry", 1): [["retry", "grid-btc-sub1"]],
        ("logs", 0): [["logs", "grid-btc-sub1", "-n", "5", "--since", "1h", "--grep", "grid"]],
        ("logs", 1): [["logs", "nosuch"]],
        ("events", 0): [["events", "--since", "1h", "--strategy", "grid-btc-sub1"]],
        ("events", 1): [["events", "--state", "fleet"]],
        ("state pull", 0): [["state", "pull", "--out", str(clone.scratch / "backup.json")]],
        ("state pull", 1): [["state", "pull", "--state", "fleet"]],
        ("state push", 0): [["suspend", "--fleet", pushed],
                            ["state", "push", str(clone.scratch / "moved.json"), "--fleet", pushed]],
        ("state push", 1): [["state", "push", str(clone.scratch / "nothing.json"), "--fleet", fresh]],
        ("leader show", 1): [["leader", "show"]],
        ("leader step-down", 1): [["leader", "step-down"]],
        ("serve", 2): [["serve", "--listen", "0.0.0.0:8421"]],
        ("init", 0): [["init", new_dir], ["init", "fleet", "--systemd"]],
        ("init", 1): [["init", "fleet"]],
    }


def test_every_command_of_the_table_exists_accepts_its_options_and_keeps_its_exit_codes(clone: Clone):
    rows = command_rows(README.read_text())
    assert len(rows) >= 15, rows
    if not (clone.root / ".venv" / "bin" / "quantlab").exists():   # run alone: the Quick start's install
        assert clone.sh("python3 -m venv .venv && .venv/bin/pip install -q -e .", timeout=300).returncode == 0
    promised: dict[str, frozenset[int]] = {}
    for row in rows:
        for synopsis in row.synopses:
            words = command_words(synopsis)
            promised[words] = row.codes
            helped = clone.ql(*words.split(), "--help")
            shown = re.sub(r"\s+", " ", helped.stdout)
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-zA-Z])\b", synopsis):
                assert re.search(rf"(?<![\w-]){re.escape(option)}\b", shown), f"`{synopsis}`: {option} not in --help"
            usage = shown.split("Usage:", 1)[1].split(".", 1)[0] if "Usage:" in shown else shown
            for placeholder in re.findall(r"\b([A-Z][A-Z|]+)(?:…|\.\.\.)?", synopsis.split(" [")[0]):
                assert placeholder in usage or placeholder.replace("|", "") in usage.replace("|", ""), \
                    f"`{synopsis}`: {placeholder} not in `{usage.strip()}`"

    table = scenarios(clone)
    for words, codes in promised.items():
        covered = {code for (w, code) in table if w == words} | {code for (w, code) in ELSEWHERE if w == words}
        assert codes <= covered, f"`quantlab {words}` promises exit codes {sorted(codes - covered)} no test shows"
        assert covered <= codes | {0}, f"`quantlab {words}`: a scenario for a code the README does not promise"
    for (words, code), test_id in ELSEWHERE.items():
        path, name = test_id.split("::")
        assert f"def {name}(" in (REPO / path).read_text(), f"{test_id} does not exist"

    # The example fleet runs under the daemon of the other test (or not at all): bring it up once.
    clone.ql("apply", "--yes")
    order = sorted(table, key=lambda k: (k[0] in ("stop-all", "init", "serve"), k))
    for words, code in order:
        steps = table[(words, code)]
        for args in steps[:-1]:
            clone.ql(*args)
        done = clone.ql(*steps[-1], check=None)
        assert done.returncode == code, \
            f"quantlab {' '.join(steps[-1])}: exit {done.returncode}, the README promises {code}\n{done.stdout}\n{done.stderr}"
    assert (clone.root / "fleet" / ".quantlab" / "deploy" / "quantlab-reconcile.service").exists()
    assert not clone.sh("git status --porcelain fleet").stdout.strip(), "init --systemd left fleet content behind"
    clone.ql("stop-all", "--yes", "--reason", "end of the README test")
