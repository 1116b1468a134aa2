"""The fleet directory's files, read for validation: the adapter between the disk (or a checkout of
one of the fleet's commits, see gitsource.py) and the pure validation in spec/loader.py.

Fails closed: a folder or file that cannot be read is a problem, never a smaller fleet. Nothing in
the directory may hang or exhaust the reader: files are opened without blocking, regular files
only, size-capped; symlinks must stay inside the fleet directory.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Callable, Iterator

from quantlab.core.spec import Fleet, FleetInvalid, Problem
from quantlab.core.spec.inputs import (
    LFS_MESSAGE,
    MAX_FILE_BYTES,
    YAML_SUFFIXES,
    FleetFile,
    StrategyFile,
    file_problem,
)
from quantlab.core.spec.loader import build_fleet, parse_fleet


def _yaml_paths(root: Path, unreadable: Callable[[OSError], None]) -> Iterator[Path]:
    """Every *.yaml/*.yml below `root`, hidden folders skipped; `unreadable` hears of each folder
    that cannot be listed (os.walk would otherwise skip it without a word)."""
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        names = sorted(filenames) + [d for d in dirnames if d.endswith(YAML_SUFFIXES)]
        for name in sorted(names):
            if name.endswith(YAML_SUFFIXES) and not name.startswith("."):
                yield here / name


def _resolve(path: Path) -> Path:
    """Path.resolve(), but a symlink loop gives the path itself (reading it then fails cleanly)."""
    try:
        return path.resolve()
    except RuntimeError:  # "Symlink loop from ..."
        return Path(os.path.abspath(path))


class _Refused(Exception):
    """A fleet file that exists but must not be read."""


class _NotRegular(_Refused):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind  # "a FIFO (named pipe)", "a directory", ...


class _TooLarge(_Refused):
    pass


class _LfsPointer(_Refused):
    pass


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _check_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise _NotRegular(_KINDS.get(stat.S_IFMT(mode), "a special file"))


def _read_regular(path: Path, cap: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at `path` (symlinks followed), read without ever blocking.

    A FIFO would block the open and a device would never end, so the type is checked before the
    open, the open does not wait, and the type is checked again on the open file (the name may
    have been swapped in between). Raises OSError, _NotRegular, or _TooLarge above `cap` bytes.
    """
    _check_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        _check_regular(info.st_mode)
        if info.st_size > cap:
            raise _TooLarge()
        data = _read_at_most(fd, cap + 1, size_hint=info.st_size + 1)
    finally:
        os.close(fd)
    if len(data) > cap:  # the file grew after fstat
        raise _TooLarge()
    return data


def _read_at_most(fd: int, limit: int, size_hint: int) -> bytes:
    chunks = []
    total = 0
    want = min(size_hint, limit)
    while total < limit:
        chunk = os.read(fd, want)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = min(2**20, limit - total)
    return b"".join(chunks)


def _unusable_strategy_file(exc: OSError | _Refused, path: Path, shown: str) -> str:
    """Why the strategy file at `path` (as written; `shown` to people) cannot be used, and what to do."""
    if isinstance(exc, _LfsPointer):
        return LFS_MESSAGE
    if isinstance(exc, _NotRegular):
        return f"is not a regular file but {exc.kind}; point strategyFile at a regular file"
    if isinstance(exc, _TooLarge):
        return (f"is larger than {MAX_FILE_BYTES // 2**20} MiB (strategy files are hashed and copied to "
                "their worker); keep bulky data out of it")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
        broken = " (symlink loop)" if exc.errno == errno.ELOOP else (
            " (broken symlink)" if os.path.islink(path) else "")
        return f"not found{broken}; expected {shown}"
    return f"cannot be read: {exc.strerror}; check its permissions"


def _unusable_fleet_dir(root: Path) -> str | None:
    """Why `root` cannot be a fleet directory, or None. A folder that cannot be listed is
    reported by the walk, like any folder below it."""
    try:
        info = os.stat(root)
    except (FileNotFoundError, NotADirectoryError):
        return "fleet directory not found; pass --fleet DIR or set QUANTLAB_FLEET"
    except OSError as exc:
        return f"cannot read fleet directory: {exc.strerror}; fix its permissions or pass another --fleet DIR"
    if not stat.S_ISDIR(info.st_mode):
        return "fleet directory is not a directory; pass --fleet DIR or set QUANTLAB_FLEET"
    return None


class _Disk:
    """Reads from `disk_root` (the fleet directory, or a checkout of one of its commits) and names
    paths in messages as if they were below `root`."""

    def __init__(self, root: Path, disk_root: Path):
        self.root, self.disk_root = root, disk_root
        self.real_root = disk_root.resolve()
        self.problems: list[Problem] = []
        self._read: dict[Path, str | Exception] = {}      # each strategy file once: sha256, or why not

    def shown(self, path: Path | str) -> str:
        if self.disk_root == self.root:
            return str(path)
        try:
            return str(self.root / Path(path).relative_to(self.disk_root))
        except ValueError:
            return str(path)

    def yaml_files(self) -> list[FleetFile]:
        return [self.yaml_file(path) for path in _yaml_paths(self.disk_root, self.unreadable_folder)]

    def unreadable_folder(self, exc: OSError) -> None:
        # Never a silently smaller fleet: its strategies would be stopped as "removed from fleet".
        folder = self.shown(exc.filename) if exc.filename is not None else str(self.root)
        self.problems.append(Problem(folder, 0, f"cannot read folder: {exc.strerror}; fix its permissions"))

    def yaml_file(self, path: Path) -> FleetFile:
        rel, shown = path.relative_to(self.disk_root).as_posix(), self.shown(path)
        if os.path.islink(path) and not _resolve(path).is_relative_to(self.real_root):
            return FleetFile(rel, shown, problem="symlink points outside the fleet directory; copy the file in instead")
        try:
            return FleetFile(rel, shown, data=_read_regular(path))
        except _NotRegular as exc:
            if exc.kind == "a directory":
                why = "is a directory, not a YAML file; rename it"
            else:
                why = f"is {exc.kind}, not a regular file; remove it or rename it"
        except _TooLarge:
            why = f"larger than {MAX_FILE_BYTES // 2**20} MiB; split it into smaller files"
        except FileNotFoundError:
            why = ("cannot read: broken symlink; fix or remove it" if os.path.islink(path)
                   else "cannot read: it disappeared while being read; run again")
        except OSError as exc:
            why = ("cannot read: symlink loop; fix or remove it" if exc.errno == errno.ELOOP
                   else f"cannot read: {exc.strerror}; check its permissions")
        return FleetFile(rel, shown, problem=why)

    def strategy_file(self, written: str) -> StrategyFile:
        """`written` (relative to the fleet directory) resolved inside it and read, or why not."""
        path = self.disk_root / written
        real = _resolve(path)
        if not real.is_relative_to(self.real_root):
            return StrategyFile(problem=f"resolves outside the fleet directory ({real}); keep strategy files inside it")
        rel = real.relative_to(self.real_root)
        hidden = [part for part in rel.parts if part.startswith(".")]
        if hidden:
            return StrategyFile(problem=f"is inside the hidden folder {hidden[0]!r} (quantlab keeps state and "
                                        "secrets of local workers in .quantlab/); keep strategy files in a plain folder")
        if real not in self._read:
            try:
                data = _read_regular(real)
                self._read[real] = _LfsPointer() if file_problem(data) else hashlib.sha256(data).hexdigest()
            except (OSError, _Refused) as exc:
                self._read[real] = exc
        found = self._read[real]
        if not isinstance(found, str):
            return StrategyFile(problem=_unusable_strategy_file(found, path, self.shown(path)))
        return StrategyFile(path=real, rel=rel.as_posix(), sha256=found)


def load_fleet(root: str | Path, checkout: Path | None = None,
               problems: tuple[tuple[str, str], ...] = ()) -> Fleet:
    """Load and validate the fleet directory at `root`; raises FleetInvalid with every problem.

    `checkout`: read the files from this folder instead (a checkout of one of the fleet's commits),
    naming them as if they were in `root`; `problems`: (path relative to root, message) found while
    checking it out, reported with the rest."""
    root = Path(root)
    unusable = _unusable_fleet_dir(checkout or root)
    if unusable is not None:
        raise FleetInvalid([Problem(str(root), 0, unusable)])
    disk = _Disk(root, checkout or root)
    files = disk.yaml_files()
    known = [Problem(str(root / rel), 0, message) for rel, message in problems] + disk.problems
    parsed = parse_fleet(root, files, known)
    return build_fleet(parsed, {written: disk.strategy_file(written) for written in parsed.strategy_files()})
