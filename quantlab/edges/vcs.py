"""Which git commit the fleet directory is at, so plans and events can say what they were made from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .gitsource import GitError, run_git


@dataclass(frozen=True)
class Revision:
    commit: str | None        # short sha, None when the fleet dir is not in a git repository
    dirty: bool = False


def _git(root: Path, *args: str) -> str | None:
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
    try:
        done = run_git(["-C", str(root), "check-ignore", "-q", "--", str(Path(path).resolve())], root, check=False)
    except GitError:
        return False
    return done.returncode == 1          # 0: ignored; 128: not in a work tree, or outside it
