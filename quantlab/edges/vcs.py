"""Which git commit the fleet directory is at, so plans and events can say what they were made from."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .gitsource import GitError, run_git


@dataclass(frozen=True)
class Revision:
    commit: str | None        # short sha, None when the fleet dir is not in a git repository
    dirty: bool = False


# check-ignore only feeds a warning: a person's `status` never waits long for it.
WARNING_GIT_DEADLINE_S = 2.0


def inside_git(root: str | Path) -> bool:
    """Whether `root` or a folder above it holds `.git` (or GIT_DIR points somewhere): git is not
    asked about a fleet outside any repository (each question is a process a command waits for)."""
    if os.environ.get("GIT_DIR"):
        return True
    here = Path(root).resolve()
    return any((folder / ".git").exists() for folder in (here, *here.parents))


def _git(root: Path, *args: str) -> str | None:
    if not inside_git(root):
        return None
    try:
        done = run_git(["-C", str(root), *args], root, check=False)     # what git starts ends with it
    except GitError:
        return None
    return done.stdout.decode(errors="replace") if done.returncode == 0 else None


def fleet_revision(root: str | Path) -> Revision:
    root = Path(root)
    commit = _git(root, "rev-parse", "--short=12", "HEAD")
    if commit is None:
        return Revision(None)
    status = _git(root, "status", "--porcelain", "--", ".")
    return Revision(commit.strip(), bool(status and status.strip()))


def tracked_by_git(root: str | Path, path: str | Path) -> bool:
    """Whether `path` lies in the git work tree of `root` without being ignored there (so a `git add`
    would take it). False outside git, and when git cannot tell."""
    if not inside_git(root):
        return False
    try:
        done = run_git(["-C", str(root), "check-ignore", "-q", "--", str(Path(path).resolve())], root, check=False,
                       timeout=WARNING_GIT_DEADLINE_S)
    except GitError:
        return False
    return done.returncode == 1          # 0: ignored; 128: not in a work tree, or outside it
