"""The local state file (the controller's memory), its lock, the events log and plan files.

The state file is written atomically (temp file in the same folder, fsync, rename, fsync the
folder) with mode 0600, so a controller killed at any moment leaves either the old or the new
version. A file this version cannot read is refused and never overwritten.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import stat
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from .atomicfile import MiB, NotARegularFile, atomic_write, describe_kind, read_regular
from quantlab.core.memory import Memory, MemoryFormatError

STATE_CAP_BYTES = 256 * MiB     # ~10,000 placements take a few MiB
WRITE_WAIT_S = 10.0             # a write lock is held for milliseconds; longer means a stuck process


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[Any]:
    """Open a file for reading lines, refusing (NotARegularFile) anything but a regular file
    without blocking on it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotARegularFile(f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        yield handle


class StateError(Exception):
    """The state file (or its lock) cannot be used; the message says why and what to do."""


class StateConflict(StateError):
    """Another controller changed the state since this one read it; nothing was written."""


class LockHeld(StateError):
    pass


_ENTRY_ENCODER = json.JSONEncoder(sort_keys=True)


def state_text(doc: dict[str, Any], encoded: dict[str, dict[str, str]] | None = None) -> bytes:
    """The state file's text: a field per line and, in the maps (placements, leases, ...), an entry
    per line, so that it reads and diffs well. Each entry is written by json's C encoder: an indented
    dump takes the pure-Python one, most of a save's CPU with hundreds of strategies (and every
    start saves). `encoded`: maps whose entries are already JSON text (see EncodedRecords)."""
    one = _ENTRY_ENCODER.encode
    encoded = encoded or {}
    lines = []
    for key in sorted(doc):
        value = doc[key]
        if isinstance(value, dict) and value:
            texts = encoded.get(key)
            entries = ",\n".join(f"  {one(k)}: {texts[k] if texts is not None else v if type(v) is int else one(v)}"
                                  for k, v in sorted(value.items()))
            lines.append(f" {one(key)}: {{\n{entries}\n }}")
        else:
            lines.append(f" {one(key)}: {one(value)}")
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


class EncodedRecords:
    """The JSON text of frozen records (placements, host clocks), kept by identity from one save to
    the next: a memory copied for a change shares every record it did not replace, so a save of
    hundreds of placements encodes only those that changed."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Any, str]] = {}

    def texts(self, records: dict[str, Any]) -> dict[str, str]:
        kept: dict[int, tuple[Any, str]] = {}
        out = {}
        for key, record in records.items():
            hit = self._by_id.get(id(record))
            if hit is None or hit[0] is not record:         # (an id is only reused once freed)
                hit = (record, _ENTRY_ENCODER.encode(record.to_json()))
            kept[id(record)] = hit
            out[key] = hit[1]
        self._by_id = kept
        return out


class StateStore:
    """Reads and writes the state file. Writes require the lock (see `lock`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.write_lock_path = self.path.with_name(self.path.name + ".writing")
        self._lock_fd: int | None = None
        self._write_fd: int | None = None
        self._write_mutex = threading.RLock()       # the threads of one process, before the flock
        self._saved: dict[str, Any] | None = None   # content as last read or written
        self._serial = 0
        self._saved_bytes: bytes | None = None      # the file's bytes as last read or written (None: no file)
        self._placements, self._host_clocks = EncodedRecords(), EncodedRecords()

    # --- reading -------------------------------------------------------------------------------

    def load(self) -> Memory:
        """The memory in the file; an empty one when there is no file yet."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self.path.is_symlink():
                # An unmounted volume, say: "no state yet" would start a new lineage over the link.
                raise StateError(f"{self.path} is a broken symlink (to {os.readlink(self.path)}): the state it "
                                 "points to is not there. Mount or restore it, or remove the link to start "
                                 "afresh") from None
            self._saved, self._serial, self._saved_bytes = None, 0, None
            return Memory()
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read the state file: {exc.strerror}") from exc
        self._refuse_if_not_a_file(st.st_mode)
        if st.st_mode & 0o002:
            raise StateError(f"{self.path}: state file is world-writable; refusing to trust it. "
                             f"Check who changed it, then run: chmod 600 {self.path}")
        try:
            data = read_regular(self.path, STATE_CAP_BYTES)
            memory = Memory.from_json(json.loads(data))
        except json.JSONDecodeError as exc:
            raise StateError(f"{self.path}:{exc.lineno}: state file is not valid JSON ({exc.msg}); it was left "
                             "untouched. Restore it from a backup, or move it away to start afresh "
                             "(running strategies are adopted on the next apply)") from exc
        except (MemoryFormatError, UnicodeDecodeError, OverflowError, RecursionError) as exc:
            raise StateError(f"{self.path}: {exc}; it was left untouched. Use the quantlab version that "
                             "wrote it, or move it away to start afresh") from exc
        except ValueError as exc:            # what json refuses past its line numbers (an integer of 5,000 digits)
            raise StateError(f"{self.path}: state file is not valid JSON ({exc}); it was left untouched. Restore "
                             "it from a backup, or move it away to start afresh") from exc
        except NotARegularFile as exc:
            raise StateError(f"{exc}; quantlab keeps its state there: move it away (`--state FILE` "
                             "picks another place)") from exc
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read the state file: {exc.strerror}") from exc
        self._saved, self._serial, self._saved_bytes = memory.content_json(), memory.serial, data
        return memory

    def fresh(self) -> "StateStore":
        """A store of its own on the same file (it knows nothing of what this one read or wrote)."""
        return StateStore(self.path)

    def changed_since_saved(self) -> bool:
        """Whether the file is other than what this store last read or wrote (another process wrote it)."""
        try:
            on_disk: bytes | None = read_regular(self.path, STATE_CAP_BYTES)
        except FileNotFoundError:
            on_disk = None
        except OSError:
            return True
        return on_disk != self._saved_bytes

    def _refuse_if_not_a_file(self, mode: int | None = None) -> None:
        """A state path that is a device, FIFO or folder is a mistake to report, never to write beside."""
        if mode is None:
            try:
                mode = self.path.stat().st_mode
            except FileNotFoundError:
                return
            except OSError as exc:
                raise StateError(f"{self.path}: cannot read the state file: {exc.strerror}") from exc
        if not stat.S_ISREG(mode):
            raise StateError(f"{self.path} is {describe_kind(mode)}, not a regular file; quantlab keeps its state "
                             "there: move it away, or pass --state FILE for another place")

    # --- writing -------------------------------------------------------------------------------

    def save(self, memory: Memory) -> Memory:
        """Write `memory` if its content changed; returns it with the serial (and lineage) it now has."""
        with self.writing():
            return self._save(memory)

    def _save(self, memory: Memory) -> Memory:
        if memory.lineage is None:
            # Set once, on the first save; a later save of a memory without one keeps the file's.
            lineage = self._saved.get("lineage") if self._saved else None
            began = self._saved.get("began") if self._saved else None
            memory = replace(memory, lineage=lineage or str(uuid.uuid4()), began=began or memory.began)
        if memory.lease_key is None:
            # Made once, like the lineage; a memory read before it existed keeps the file's.
            memory = replace(memory, lease_key=(self._saved or {}).get("leaseKey") or secrets.token_hex(32))
        content = memory.content_json()
        if content == self._saved:
            return replace(memory, serial=self._serial)
        self._check_unchanged_on_disk()
        memory = replace(memory, serial=self._serial + 1)
        data = state_text({**content, "serial": memory.serial},
                          {"placements": self._placements.texts(memory.placements),
                           "hostClocks": self._host_clocks.texts(memory.host_clocks)})
        try:
            atomic_write(self.path, data)
        except OSError as exc:
            # Renewals are booked here before they are sent: while this fails, none goes out, and the
            # strategies fence themselves when their leases end (the safe way round).
            raise StateError(f"{self.path}: cannot write the state file: {exc.strerror or exc}; free space or "
                             "fix permissions there — no lease can be renewed until it can be written") from None
        self._saved, self._serial, self._saved_bytes = content, memory.serial, data
        self._remove_stale_temp_files()
        return memory

    def _remove_stale_temp_files(self) -> None:
        # Left by writers killed mid-save; we hold the lock, so no other writer owns one now.
        for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            with contextlib.suppress(OSError):
                stale.unlink()

    def _check_unchanged_on_disk(self) -> None:
        """Never overwrite a file this store did not read (an unreadable one, or one another process
        wrote since): that would lose its content or reuse its serial for different content."""
        try:
            on_disk: bytes | None = read_regular(self.path, STATE_CAP_BYTES)
        except FileNotFoundError:
            on_disk = None
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read the state file: {exc}") from exc
        if on_disk != self._saved_bytes:
            raise StateError(f"{self.path}: the state file is not the one this run read (it was changed by "
                             "another process, or could not be read); it was left untouched. Run the command "
                             "again")

    # --- locking -------------------------------------------------------------------------------

    def _open_lock(self, path: Path) -> int:
        self._refuse_if_not_a_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"{path}: cannot create the state lock: {exc.strerror}; check that "
                             f"{path.parent} is a writable folder") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StateError(f"{path} is not a regular file; move it away")
        return fd

    @staticmethod
    def _flock(fd: int, timeout: float) -> bool:
        """Take the flock on `fd`, polling until `timeout` has passed; False when it could not."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    @contextlib.contextmanager
    def writing(self, timeout: float = WRITE_WAIT_S) -> Iterator[None]:
        """The short lock each write of the state takes — read what is there, change it, write it —
        so that processes sharing the state (a daemon renewing while `apply` acts) never lose each
        other's changes. Re-entrant within a thread; held for milliseconds, never across a network
        call."""
        with self._write_mutex:
            if self._write_fd is not None:
                yield
                return
            fd = self._open_lock(self.write_lock_path)
            try:
                if not self._flock(fd, timeout):
                    raise StateError(f"{self.write_lock_path}: another process held the state's write lock for more "
                                     f"than {timeout:g}s; is a quantlab process stuck? Check `ps` for one")
                self._write_fd = fd
                yield
            finally:
                self._write_fd = None
                os.close(fd)

    @contextlib.contextmanager
    def lock(self, timeout: float = 0.0, command: str | None = None) -> Iterator[None]:
        """Hold the state lock (flock on a sibling file): who may plan and act on the fleet, one run
        at a time. Fails at once, naming the holder, unless `timeout` says how long to wait."""
        fd = self._open_lock(self.lock_path)
        acquired = False
        try:
            if not self._flock(fd, timeout):
                raise LockHeld(self._held_message(timeout))
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "command": command or " ".join(["quantlab"] + sys.argv[1:]),
                      "startedAt": int(time.time() * 1000)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            self._lock_fd, acquired = fd, True
            yield
        finally:
            if acquired:            # a failed (e.g. nested) attempt must not drop a lock held outside it
                self._lock_fd = None
            os.close(fd)        # closing releases the flock

    def holder(self) -> dict[str, Any] | None:
        # The holder writes its details right after taking the lock; give it a moment to finish.
        for _ in range(20):
            try:
                text = self.lock_path.read_text()
                if text:
                    return json.loads(text)
            except (OSError, json.JSONDecodeError):
                pass
            time.sleep(0.01)
        return None

    def _held_message(self, waited: float) -> str:
        info = self.holder()
        waited_words = f" after waiting {waited:g}s" if waited else ""
        if info is None:
            who = "another process"
        else:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("startedAt", 0) / 1000))
            who = f"pid {info.get('pid')} on {info.get('host')} ({info.get('command')}), since {since}"
        return (f"{self.path}: state is locked by {who}{waited_words}; wait for it to finish or pass "
                "--lock-timeout SECONDS")
