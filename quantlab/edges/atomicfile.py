"""Files the controller keeps: replaced so that readers see the old or the new content, never a
mix; and read only when they are regular files of a sane size, without a blocking open, so a FIFO
or a device put in their place gives a clear error instead of a hang (stdlib only)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

MiB = 1024 * 1024


class NotARegularFile(OSError):
    """The path exists but cannot be read as a file: the message says what it is and what to do."""


def describe_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular(path: Path, cap: int) -> bytes:
    """The bytes of `path`, which must be a regular file (a symlink to one is fine) of at most
    `cap` bytes. FileNotFoundError when it is missing; NotARegularFile for anything else wrong."""
    mode = os.stat(path).st_mode            # before any open: opening a device can have effects
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{path} is {describe_kind(mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{path} is {describe_kind(info.st_mode)}, not a regular file")
        if info.st_size > cap:
            raise NotARegularFile(f"{path} is larger than {cap // MiB} MiB ({info.st_size} bytes)")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise NotARegularFile(f"{path} grew past {cap // MiB} MiB while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_replaceable(path: Path) -> None:
    """NotARegularFile when something other than a regular file (a symlink to one is fine) is at
    `path`: a file written where a person said (a saved plan, a copy of the state) replaces an older
    file, never a folder, a FIFO or a device found there. Only stat()ed, never opened: no hang."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{path} is {describe_kind(mode)}, not a regular file")


def atomic_write(path: Path, data: bytes, mode: int = 0o600, sync_dir: bool = True, files_only: bool = False) -> None:
    """Replace `path` with `data` so that readers see the old or the new content, never a mix.
    `sync_dir=False`: the caller syncs the folder once after several writes (`fsync_dir`).
    `files_only`: refuse (NotARegularFile) to replace anything but a regular file (check_replaceable).
    A write that fails leaves no temporary file behind (it may hold a whole state)."""
    if files_only:
        check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if files_only:
            check_replaceable(path)      # again: something may have been put there meanwhile
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(path.parent)
