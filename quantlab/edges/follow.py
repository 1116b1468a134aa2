"""What the reconcile loop applies: the commits of a ref, or (outside git, or with --working-tree)
the files on disk.

A `Source` names it — the state remembers the one the loop last applied, so that a change of
source is noticed and guarded (see `source_change`). A `Follower` reads the fleet of the followed
ref's newest commit (with --git-pull: the upstream's, fetched into a private mirror, fast-forwards
only) and says what it does not apply: uncommitted changes, an operation in progress.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .gitsource import GitError, Mirror, Pulled, Repo, Checkouts
from .fleetfiles import load_fleet
from quantlab.core.spec import Fleet, FleetInvalid
from .vcs import fleet_revision


@dataclass(frozen=True)
class Source:
    kind: str                  # "directory" (outside git) | "working-tree" | "commits" | "upstream"
    ref: str | None = None     # refs/heads/main; origin/main for upstream; HEAD when it is detached

    def key(self) -> dict[str, Any]:
        return {"kind": self.kind, **({"ref": self.ref} if self.ref else {})}

    @classmethod
    def from_key(cls, raw: dict[str, Any] | None) -> "Source | None":
        if not raw or not raw.get("kind"):
            return None
        return cls(str(raw["kind"]), raw.get("ref"))

    def words(self) -> str:
        return {"directory": "the fleet directory (not in git)", "working-tree": "the working tree",
                "commits": "the commit checked out (detached HEAD)" if self.ref == "HEAD" else f"the commits of {self.ref}",
                "upstream": f"the commits of {self.ref} (pulled)"
                }.get(self.kind, self.kind)


def _on_disk(source: Source | None) -> bool:
    return source is None or source.kind in ("directory", "working-tree")


def source_change(before: dict[str, Any] | None, now: Source) -> str | None:
    """Why stops and restarts wait for --allow-source-change on this round, or None. The files on
    disk are one source however they were read (a state no loop of this release applied was
    applied from disk); commits of a ref are another."""
    old = Source.from_key(before)
    if old == now or (_on_disk(old) and _on_disk(now)):
        return None
    was = old.words() if old else "unknown (no loop of this release has applied this state yet)"
    return f"the loop now applies {now.words()}; before: {was}"


def load_working_tree(fleet_dir: Path) -> Fleet:
    """The fleet as on disk, with the commit it is at and whether it has uncommitted changes."""
    fleet = load_fleet(fleet_dir)
    revision = fleet_revision(fleet_dir)
    if revision.commit is None:
        return fleet
    return replace(fleet, revision=revision.commit, uncommitted=revision.dirty, source="working tree")


class Follower:
    """The reconcile loop's view of the fleet. Thread-safe: the pull job and the act round share it."""

    def __init__(self, fleet_dir: Path, state_dir: Path, *, working_tree: bool = False, pull: bool = False):
        self.fleet_dir = fleet_dir
        self.repo = None if working_tree else Repo.of(fleet_dir)
        self.mirror: Mirror | None = None
        self.checkouts = Checkouts(state_dir / "revisions")
        self._lock = threading.Lock()
        self._cached: tuple[str, Fleet | FleetInvalid] | None = None
        self._pulled: Pulled | None = None
        self.upstream: tuple[str, str, str] | None = None
        if self.repo is None:
            try:
                in_git = working_tree and Repo.of(fleet_dir) is not None
            except GitError:
                in_git = True             # another user's repository: the files on disk are what is asked
            self.source = Source("working-tree" if in_git else "directory")
            if pull:
                raise GitError(f"--git-pull: {fleet_dir} is not in a git work tree"
                               if not working_tree else "--git-pull and --working-tree exclude each other")
            return
        branch = self.repo.branch()
        if pull:
            if branch is None:
                raise GitError(f"--git-pull: HEAD is detached in {self.repo.toplevel}; check out the branch "
                               "whose upstream the loop should follow")
            self.upstream = self.repo.upstream(branch)
            remote, _, merge = self.upstream
            self.mirror = Mirror(state_dir / "git-mirror.git", self.repo)
            self.source = Source("upstream", f"{remote}/{merge.removeprefix('refs/heads/')}")
        else:
            # On a detached HEAD (a deploy checkout) the loop applies whatever commit is checked out.
            self.source = Source("commits", branch or "HEAD")

    @property
    def follows_commits(self) -> bool:
        return self.repo is not None

    # --- what is not applied -------------------------------------------------------------------

    def paused(self) -> str | None:
        """Why the loop applies nothing now (an operation in progress in the operator's work tree
        that moves the followed branch), or None. A pulled upstream is not affected."""
        if self.repo is None or self.mirror is not None:
            return None
        what = self.repo.in_progress()
        if what is None:
            return None
        return (f"{what} is in progress in {self.repo.toplevel}; the loop renews leases and applies nothing "
                "until it is finished or aborted")

    def uncommitted(self) -> list[str]:
        return self.repo.uncommitted() if self.repo is not None else []

    # --- pulling (off the renewal path) --------------------------------------------------------

    def pulled_before(self) -> bool:
        """Whether the mirror holds a commit pulled by an earlier run."""
        try:
            return self.mirror is not None and self.mirror.commit_of(Mirror.SYNCED) is not None
        except GitError:
            return False

    def pull(self, deadline_s: float) -> Pulled:
        """Fetch the upstream into the mirror and take its commit if it fast-forwards."""
        assert self.mirror is not None and self.upstream is not None
        _, url, merge = self.upstream
        self.mirror.fetch(url, merge, deadline_s)
        pulled = self.mirror.advance()
        with self._lock:
            self._pulled = pulled
        return pulled

    # --- the commit and its fleet --------------------------------------------------------------

    def commit(self) -> str:
        assert self.repo is not None and self.source.ref is not None
        if self.mirror is not None:
            with self._lock:
                pulled = self._pulled
            commit = pulled.commit if pulled is not None else self.mirror.commit_of(Mirror.SYNCED)
            if commit is None:
                raise GitError(f"nothing pulled from {self.source.ref} yet")
            return commit
        commit = self.repo.commit_of(self.source.ref)
        if commit is None:
            raise GitError(f"{self.source.ref} does not name a commit in {self.repo.toplevel}")
        return commit

    def load(self, log: Callable[[str], None] | None = None) -> Fleet:
        """The fleet of the followed ref's newest commit (read once per commit); FleetInvalid or
        GitError when it cannot be used."""
        if self.repo is None:
            return load_working_tree(self.fleet_dir) if self.source.kind == "working-tree" else load_fleet(self.fleet_dir)
        commit = self.commit()
        cached = self._cached
        if cached is not None and cached[0] == commit:
            found = cached[1]
        else:
            found, settled = self._read(commit)
            # What git could not give (a submodule not cloned, a missing object) may be fixed
            # without a new commit: read again next round. A commit's own problems stay.
            self._cached = (commit, found) if settled else None
        if isinstance(found, FleetInvalid):
            raise found
        return found

    def _read(self, commit: str) -> tuple[Fleet | FleetInvalid, bool]:
        """The fleet of `commit` (or why it does not validate), and whether that is final."""
        assert self.repo is not None
        git_dir = self.mirror.path if self.mirror is not None else None
        folder, problems = self.checkouts.make(self.repo, commit, git_dir)
        try:
            fleet = load_fleet(self.fleet_dir, folder, tuple(problems))
        except FleetInvalid as exc:
            return exc, not problems
        return replace(fleet, revision=commit[:12], uncommitted=False, source=f"commit of {self.source.ref}"), True
