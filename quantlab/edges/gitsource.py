"""The fleet directory's git repository, read through git itself.

The loop applies commits, not whatever is on disk: the fleet's files of one commit are checked out
by git into a private folder (`checkout`), so line-ending and smudge filters, symlinks and
submodules give exactly the bytes (and so the same specHash) a `git checkout` would, and nothing of
the working tree is ever read instead. With `--git-pull`, the upstream is fetched into a private
mirror (`Mirror`) that never touches the operator's work tree, index or refs.

Every git command runs without a terminal (GIT_TERMINAL_PROMPT=0, SSH in batch mode) and within a
deadline; a git that cannot answer is a `GitError`, never a hang.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GIT_DEADLINE_S = 10.0          # one local git command; real ones take milliseconds
FETCH_DEADLINE_S = 60.0        # one fetch of the upstream
GITLINK = "160000"

# git-rev-parse --git-path NAME exists while the operation is in progress
IN_PROGRESS = (("rebase-merge", "a rebase"), ("rebase-apply", "a rebase"), ("MERGE_HEAD", "a merge"),
               ("BISECT_LOG", "a bisect"), ("CHERRY_PICK_HEAD", "a cherry-pick"), ("REVERT_HEAD", "a revert"))

_MISSING = re.compile(r"unable to read sha1 file of (.+) \(([0-9a-f]+)\)")


class GitError(Exception):
    """git could not be run, did not answer in time, or refused."""


def git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "LANGUAGE": "C",
                # `git status` from the loop must not take index.lock from under the operator
                "GIT_OPTIONAL_LOCKS": "0", "GIT_ASKPASS": "true", "SSH_ASKPASS": "true"})
    if "GIT_SSH_COMMAND" not in env and "GIT_SSH" not in env:
        env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes"
    env.update(extra or {})
    return env


def run_git(args: list[str], cwd: Path, *, input: bytes | None = None, timeout: float | None = None,
            env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    timeout = GIT_DEADLINE_S if timeout is None else timeout
    try:
        # A session of its own: what git runs (a smudge filter, ssh for a fetch) ends with it.
        with subprocess.Popen(["git", *args], cwd=cwd, env=git_env(env), start_new_session=True,
                              stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            try:
                stdout, stderr = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                _end_group(proc)
                raise GitError(f"`git {args[0]}` did not finish within {timeout:g} s") from None
            except BaseException:
                _end_group(proc)
                raise
    except OSError as exc:
        raise GitError(f"cannot run git: {exc.strerror}; install git") from None
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check and done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise GitError(f"`git {args[0]}` failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return done


def _end_group(proc: subprocess.Popen) -> None:
    """Kill git and everything it started (its process group), and reap git."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def _out(done: subprocess.CompletedProcess) -> str:
    return done.stdout.decode(errors="replace").strip()


@dataclass(frozen=True)
class Repo:
    """A git work tree that holds the fleet directory at `prefix` ("" or "fleet/")."""

    toplevel: Path
    prefix: str
    git_dir: Path          # this work tree's own git dir (rebase and merge state live here)
    common_dir: Path       # objects and refs (shared by linked work trees)

    @classmethod
    def of(cls, fleet_dir: Path) -> "Repo | None":
        """The work tree `fleet_dir` is in, or None outside git (or when git is missing). GitError
        when git cannot read the repository (another user's, a broken config, no answer)."""
        if not os.path.isdir(fleet_dir):
            return None
        try:
            done = run_git(["rev-parse", "--is-inside-work-tree", "--show-toplevel", "--show-prefix",
                            "--absolute-git-dir", "--git-common-dir"], fleet_dir, check=False)
        except GitError as exc:
            if "cannot run git" in str(exc):
                return None                  # no git on this machine: the files on disk are all there is
            raise GitError(f"cannot tell whether {fleet_dir} is in a git repository: {exc}") from None
        lines = done.stdout.decode(errors="replace").splitlines()
        error = done.stderr.decode(errors="replace").strip()
        if done.returncode != 0:
            if "not a git repository" in error:
                return None
            # Reading the files on disk instead would apply uncommitted edits: refuse, and say why.
            owned = " (it is owned by another user: run quantlab as that user, or mark it safe with `git config " \
                    "--global --add safe.directory PATH`)" if "ownership" in error or "unsafe" in error else ""
            last = error.splitlines()[-1] if error else f"exit {done.returncode}"
            raise GitError(f"git cannot read the repository of {fleet_dir}{owned}: {last}")
        if len(lines) < 5 or lines[0] != "true":
            return None                      # inside a .git folder or a bare repository
        top = Path(lines[1])
        common = Path(lines[4]) if os.path.isabs(lines[4]) else (Path(fleet_dir) / lines[4]).resolve()
        return cls(top, lines[2], Path(lines[3]), common)

    def git(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run_git(list(args), self.toplevel, **kw)

    def branch(self) -> str | None:
        """The branch checked out (refs/heads/...), or None on a detached HEAD."""
        done = self.git("symbolic-ref", "-q", "HEAD", check=False)
        return _out(done) or None if done.returncode == 0 else None

    def commit_of(self, ref: str) -> str | None:
        done = self.git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}", check=False)
        return _out(done) or None if done.returncode == 0 else None

    def in_progress(self) -> str | None:
        """"a rebase", "a merge", ... while one is under way in this work tree, else None."""
        for name, what in IN_PROGRESS:
            if (self.git_dir / name).exists():
                return what
        return None

    def uncommitted(self) -> list[str]:
        """`git status --porcelain` lines for the fleet directory (the state folder left out)."""
        where = self.prefix or "."
        done = self.git("status", "--porcelain=v1", "--untracked-files=all", "--", where,
                        f":(exclude){self.prefix}.quantlab")
        return [line for line in done.stdout.decode(errors="replace").splitlines() if line.strip()]

    def upstream(self, branch: str) -> tuple[str, str, str]:
        """(remote name, its URL, the ref fetched from it) of `branch`'s upstream."""
        short = branch.removeprefix("refs/heads/")
        remote = _out(self.git("config", "--get", f"branch.{short}.remote", check=False))
        merge = _out(self.git("config", "--get", f"branch.{short}.merge", check=False))
        if not remote or not merge:
            raise GitError(f"branch {short} has no upstream; set one with `git branch --set-upstream-to "
                           f"origin/{short}`, or run without --git-pull")
        # "." is this repository itself (a branch that tracks another local branch)
        url = str(self.git_dir) if remote == "." else _out(self.git("config", "--get", f"remote.{remote}.url", check=False))
        if not url:
            raise GitError(f"remote {remote} of branch {short} has no URL; check `git remote -v`")
        return remote, url, merge

    def checkout(self, commit: str, into: Path, git_dir: Path | None = None) -> tuple[Path, list[tuple[str, str]]]:
        """Write the fleet directory's files of `commit` into the new folder `into`, as `git checkout`
        would (the commit's .gitattributes, filters, symlinks), submodules at their recorded commits.
        Returns where the fleet directory is in it, and problems as (path in the fleet dir, message).
        `git_dir`: read objects from this repository (the pull mirror) instead."""
        # git runs in another folder (the work tree's top, with a scratch work tree): a relative
        # path would be read from there, and the checkout would land in the scratch folder.
        into = Path(os.path.abspath(into))
        try:
            into.mkdir(mode=0o700, parents=True)
            problems = self._checkout(commit, into, self.prefix, git_dir)
            fleet = into / self.prefix if self.prefix else into
            fleet.mkdir(parents=True, exist_ok=True)    # a commit without the fleet dir: "no YAML files"
        except OSError as exc:
            raise GitError(f"cannot check commit {commit[:12]} out into {into}: {exc.strerror}") from None
        return fleet, problems

    def _checkout(self, commit: str, into: Path, prefix: str, git_dir: Path | None) -> list[tuple[str, str]]:
        scratch = Path(tempfile.mkdtemp(prefix="quantlab-index-"))
        index = scratch / "index"
        (scratch / "empty").mkdir()
        env = {"GIT_INDEX_FILE": str(index)}
        # An empty work tree: attributes (filters, line endings) come from the commit's own
        # .gitattributes in the index, never from an uncommitted one in the operator's work tree.
        pre = [f"--git-dir={git_dir or self.git_dir}", f"--work-tree={scratch / 'empty'}"]
        try:
            self.git(*pre, "read-tree", commit, env=env)
            listed = self.git(*pre, "ls-files", "-s", "-z", "--", prefix or ".", env=env).stdout
            files, links = [], []
            for record in filter(None, listed.split(b"\0")):
                meta, _, path = record.partition(b"\t")
                mode, oid = meta.split(b" ")[:2]
                (links if mode.decode() == GITLINK else files).append((path.decode(errors="replace"), oid.decode()))
            done = self.git(*pre, "checkout-index", "-z", "--stdin", f"--prefix={into}/",
                            input=b"\0".join(p.encode() for p, _ in files), env=env, check=False)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        problems = []
        for line in done.stderr.decode(errors="replace").splitlines():
            found = _MISSING.search(line)
            if found:
                problems.append((self._in_fleet(found.group(1), prefix),
                                 f"its object {found.group(2)[:12]} is missing from the repository (a shallow or "
                                 "partial clone?); fetch it (`git fetch --unshallow`), or fix the commit"))
        if done.returncode != 0 and not problems:
            text = done.stderr.decode(errors="replace").strip().splitlines()
            problems.append(("", f"git could not check out commit {commit[:12]}: {text[-1] if text else 'failed'}"))
        for path, oid in links:
            problems += self._submodule(path, oid, into, prefix)
        return problems

    def _submodule(self, path: str, oid: str, into: Path, prefix: str) -> list[tuple[str, str]]:
        """A submodule inside the fleet directory, read at its recorded commit from its own clone."""
        here = self._in_fleet(path, prefix)
        sub = Repo.of(self.toplevel / path)
        if sub is None or sub.toplevel.resolve() != (self.toplevel / path).resolve() or sub.commit_of(oid) is None:
            return [(here, f"submodule at commit {oid[:12]} is not available in {self.toplevel / path}; run "
                           "`git submodule update --init` there")]
        target = into / path
        target.mkdir(parents=True, exist_ok=True)
        nested = sub._checkout(oid, target, "", None)
        return [(f"{here}/{p}" if p else here, m) for p, m in nested]

    def _in_fleet(self, path: str, prefix: str) -> str:
        return path[len(prefix):] if prefix and path.startswith(prefix) else path


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


class Checkouts:
    """Private checkouts of the commits the loop reads, in `folder` (under the state folder); the
    newest one stays, older ones go."""

    def __init__(self, folder: Path):
        self.folder = Path(os.path.abspath(folder))      # handed to git, which runs elsewhere

    def make(self, repo: Repo, commit: str, git_dir: Path | None = None) -> tuple[Path, list[tuple[str, str]]]:
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise GitError(f"cannot make {self.folder}: {exc.strerror}") from None
        into = self.folder / f"{commit[:12]}-{os.getpid()}-{time.monotonic_ns()}"
        self.prune()
        return repo.checkout(commit, into, git_dir)

    def prune(self) -> None:
        """Remove this process's older checkouts (its fleet moved on to a newer commit), and those
        of processes that ended: a running daemon may still read strategy files from its own."""
        try:
            entries = list(self.folder.iterdir())
        except OSError:
            return
        for entry in entries:
            parts = entry.name.split("-")
            pid = int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None
            if pid is not None and pid != os.getpid() and _alive(pid):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@dataclass(frozen=True)
class Pulled:
    commit: str | None             # the commit the loop may apply (fast-forwards only)
    refused: str | None = None     # why the newest fetch was not taken (diverged, rewritten)


class Mirror:
    """A private bare repository under the state folder that fetches the upstream. It borrows the
    operator's objects (git alternates), so a fetch brings only what is new, and it never writes to
    the operator's repository."""

    SYNCED, FETCHED = "refs/quantlab/synced", "refs/quantlab/fetched"

    def __init__(self, path: Path, repo: Repo):
        self.path = Path(os.path.abspath(path))          # handed to git, which runs elsewhere
        self.repo = repo

    def _git(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run_git([f"--git-dir={self.path}", *args], self.repo.toplevel, **kw)

    def ensure(self) -> None:
        if (self.path / "HEAD").exists():
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            run_git(["init", "-q", "--bare", str(self.path)], self.repo.toplevel)
            alternates = self.path / "objects" / "info" / "alternates"
            alternates.write_text(f"{self.repo.common_dir / 'objects'}\n")
        except OSError as exc:
            raise GitError(f"cannot make the pull mirror {self.path}: {exc.strerror}") from None
        for key in ("core.autocrlf", "core.eol"):  # checkouts from here write what the operator's would
            value = _out(self.repo.git("config", "--get", key, check=False))
            if value:
                self._git("config", key, value)

    def fetch(self, url: str, ref: str, deadline_s: float = FETCH_DEADLINE_S) -> None:
        self.ensure()
        self._git("fetch", "--no-tags", "--quiet", "--no-write-fetch-head", url, f"+{ref}:{self.FETCHED}",
                  timeout=deadline_s)

    def commit_of(self, ref: str) -> str | None:
        done = self._git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}", check=False)
        return _out(done) or None if done.returncode == 0 else None

    def advance(self) -> Pulled:
        """Take the fetched commit if it fast-forwards what the loop applied before."""
        fetched, synced = self.commit_of(self.FETCHED), self.commit_of(self.SYNCED)
        if fetched is None:
            return Pulled(synced)
        if synced is None or synced == fetched or \
                self._git("merge-base", "--is-ancestor", synced, fetched, check=False).returncode == 0:
            self._git("update-ref", self.SYNCED, fetched)
            return Pulled(fetched)
        return Pulled(synced, refused=f"the upstream's {fetched[:12]} does not contain {synced[:12]}, the commit "
                                      "the loop applies (history diverged or was rewritten); nothing from it is "
                                      "applied until the upstream contains it again (or remove "
                                      f"{self.path} to start over from the upstream)")
