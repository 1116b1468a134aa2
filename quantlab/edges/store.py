"""The local state file (the controller's memory), its lock, the events log and plan files.

The state file is written atomically (temp file in the same folder, fsync, rename, fsync the
folder) with mode 0600, so a controller killed at any moment leaves either the old or the new
version. A file this version cannot read is refused and never overwritten.
"""
from __future__ import annotations

import contextlib
import fcntl
import base64
import binascii
import json
import os
import posixpath
import re
import secrets
import socket
import stat
import sys
import threading
import time
import uuid
import zlib
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from .atomicfile import MiB, NotARegularFile, atomic_write, describe_kind, fsync_dir, read_regular
from quantlab.core.memory import Memory, MemoryFormatError
from quantlab.core.plan import Plan

STATE_CAP_BYTES = 256 * MiB     # ~10,000 placements take a few MiB
WRITE_WAIT_S = 10.0             # a write lock is held for milliseconds; longer means a stuck process
PLAN_CAP_BYTES = 64 * MiB


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
        data = json.dumps(memory.to_json(), indent=1, sort_keys=True).encode() + b"\n"
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


# --- events --------------------------------------------------------------------------------------

# The last instant a date can show (9999-12-31T23:59:59.999Z), in epoch ms.
LAST_EVENT_T = 253402300799999
# Fields that name something (a strategy, a worker, who acted...): text or null when present.
EVENT_NAME_FIELDS = ("event", "strategy", "worker", "from", "to", "actor", "outcome", "kind", "revision")


def event_problem(event: Any) -> str | None:
    """Why `event` (one parsed events log line, or an event a host reported) is not an event that
    can be read, filtered, sorted and shown; None when it is: an object whose time `t`, when it has
    one, is epoch ms, and whose fields that name something hold text (or null). Free text fields
    (detail, reason, error, message) may hold anything: they are shown as text."""
    if not isinstance(event, dict):
        return f"a JSON {_json_kind(event)}, not an event object"
    t = event.get("t", 0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= LAST_EVENT_T:
        return f"its time t is {str(t)[:40]!r}, not epoch milliseconds"
    for key in EVENT_NAME_FIELDS:
        if event.get(key) is not None and not isinstance(event[key], str):
            return f"its {key} is a JSON {_json_kind(event[key])}, not text"
    return None


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


class EventLog:
    """History as JSON Lines beside the state file, rotated by size so it cannot fill the disk."""

    def __init__(self, path: str | Path, max_bytes: int = 5 * 1024 * 1024, keep: int = 3):
        self.path = Path(path)
        self.max_bytes, self.keep = max_bytes, keep
        self.failure: str | None = None       # why an append failed, if one did (kept: a run reports it)
        self._lock = threading.Lock()          # apply records outcomes from one thread per host
        # Of the last read: how many lines were skipped, and the first of them as "FILE:LINE: why".
        self.skipped = 0
        self.first_skipped: str | None = None

    def append(self, event: dict[str, Any]) -> bool:
        """Add one event; False (and `failure` says why) when it could not be written. History is
        best effort: a full disk or a FIFO in the log's place must never stop what it records."""
        with self._lock:
            try:
                self._append(event)
            except OSError as exc:
                self.failure = f"{self.path}: cannot write the events log: {exc}"
                return False
            return True

    def _append(self, event: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        line = (json.dumps(event, sort_keys=True, ensure_ascii=False) + "\n").encode()
        try:
            size = self.path.stat().st_size
            if size and size + len(line) > self.max_bytes:     # never rotate an empty file
                self._rotate()
        except FileNotFoundError:
            pass
        # O_NONBLOCK: a FIFO put in the log's place fails the open instead of hanging it.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotARegularFile(f"{self.path} is not a regular file")
            os.write(fd, line)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def read(self) -> Iterator[dict[str, Any]]:
        """Every recorded event, oldest first. A line that is not an event (bad JSON, a cut line, or
        odd types: see event_problem) is skipped and counted in `skipped`, the first one named in
        `first_skipped`: one bad line must never hide the rest of the history."""
        self.skipped, self.first_skipped = 0, None
        files = [self.path.with_name(f"{self.path.name}.{n}") for n in range(self.keep, 0, -1)] + [self.path]
        for file in files:
            try:
                with open_regular(file) as handle:
                    for number, raw in enumerate(handle, 1):
                        if not raw.strip():
                            continue
                        try:
                            event = json.loads(raw)
                            why = event_problem(event)
                        except ValueError:          # bad JSON, or bytes that are not UTF-8
                            why = "not a line of JSON"
                        except RecursionError:      # nested too deep to parse
                            why = "nested too deep"
                        if why is None:
                            yield event
                            continue
                        self.skipped += 1
                        if self.first_skipped is None:
                            self.first_skipped = f"{file}:{number}: {why}"
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StateError(f"cannot read the events log: {exc}; move it away") from None


# --- checkpoints ---------------------------------------------------------------------------------

# What the controller accepts of one checkpoint a host sends: compressed (as the agent caps it) and
# once decompressed (a small compressed file may expand a thousandfold).
CHECKPOINT_COMPRESSED_CAP = 1 * MiB
CHECKPOINT_EXPANDED_CAP = 64 * MiB


_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def checked_checkpoint(checkpoint: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the checkpoint a host sent, as it may be kept, or None; why not). A host's answer is hostile
    input: every entry must name a file inside the folder (no two the same once normalised, none
    inside another), hold complete zlib data, and stay within the caps compressed and decompressed.
    Only the fields the controller uses are kept."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("files"), dict):
        return None, "not a checkpoint"
    files: dict[str, str] = {}
    compressed = expanded = 0
    for rel, data in checkpoint["files"].items():
        clean = posixpath.normpath(rel) if isinstance(rel, str) else ""
        if not isinstance(data, str) or not clean or clean in (".", "..") or clean.startswith(("/", "../")) \
                or clean in files:
            return None, f"bad entry {str(rel)[:80]!r}"
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return None, f"{clean[:80]}: not base64"
        compressed += len(raw)
        if compressed > CHECKPOINT_COMPRESSED_CAP:
            return None, f"over {CHECKPOINT_COMPRESSED_CAP // MiB} MiB compressed"
        unpack = zlib.decompressobj()
        try:
            expanded += len(unpack.decompress(raw, CHECKPOINT_EXPANDED_CAP - expanded + 1))
        except zlib.error:
            return None, f"{clean[:80]}: not zlib data"
        if expanded > CHECKPOINT_EXPANDED_CAP or unpack.unconsumed_tail:
            return None, f"over {CHECKPOINT_EXPANDED_CAP // MiB} MiB decompressed"
        if not unpack.eof or unpack.unused_data:
            return None, f"{clean[:80]}: incomplete zlib data"
        files[clean] = data
    folders = {str(parent) for rel in files for parent in PurePosixPath(rel).parents}
    inside = sorted(folders & set(files))
    if inside:
        return None, f"bad entry {inside[0][:80]!r}: both a file and a folder"
    digest = checkpoint.get("hash")
    t = checkpoint.get("t")
    return {"files": files, "hash": digest if isinstance(digest, str) and _HASH.fullmatch(digest) else None,
            "t": t if isinstance(t, int) and not isinstance(t, bool) else None}, None


class CheckpointStore:
    """The last copy of each strategy's checkpoint folder, beside the state file (mode 0600), put back
    on the new worker when the strategy moves. Each copy carries the hash the agent computed of the
    folder, which the next request sends back so that an unchanged folder is not sent again."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._hashes: dict[str, str | None] = {}          # strategy -> its copy's hash, as read or written
        self._lock = threading.Lock()

    def _path(self, strategy: str) -> Path:
        return self.folder / f"{strategy}.json"

    def save(self, strategy: str, checkpoint: dict[str, Any]) -> None:
        self.save_many({strategy: checkpoint})

    def save_many(self, copies: dict[str, dict[str, Any]]) -> None:
        """Write these copies, each atomically, and sync the folder once for all of them."""
        if not copies:
            return
        for strategy, checkpoint in sorted(copies.items()):
            atomic_write(self._path(strategy), json.dumps(checkpoint).encode(), mode=0o600, sync_dir=False)
            with self._lock:
                self._hashes[strategy] = checkpoint.get("hash")
        fsync_dir(self.folder)

    def names(self) -> list[str]:
        """The strategies that have a copy here."""
        try:
            return sorted(p.stem for p in self.folder.glob("*.json"))
        except OSError:
            return []

    def hash_of(self, strategy: str) -> str | None:
        with self._lock:
            if strategy in self._hashes:
                return self._hashes[strategy]
        found = self.load(strategy)
        digest = found.get("hash") if found is not None and isinstance(found.get("hash"), str) else None
        with self._lock:
            self._hashes[strategy] = digest
        return digest

    def forget(self, strategy: str) -> bool:
        with self._lock:
            self._hashes.pop(strategy, None)
        try:
            self._path(strategy).unlink()
            return True
        except FileNotFoundError:
            return False

    def prune(self, keep: set[str], now_s: float, retention_s: float) -> list[str]:
        """Remove the copies of strategies not in `keep` (gone from the fleet and from every worker)
        `retention_s` after a run first found them gone, which a `<id>.gone` marker beside the copy
        records (a strategy that comes back loses its marker); the ids removed."""
        removed = []
        try:
            copies = {p.stem: p for p in self.folder.glob("*.json")}
            markers = {p.stem: p for p in self.folder.glob("*.gone")}
        except OSError:
            return removed
        for sid, marker in markers.items():
            if sid in keep or sid not in copies:
                marker.unlink(missing_ok=True)
        for sid, path in sorted(copies.items()):
            if sid in keep:
                continue
            marker = path.with_suffix(".gone")
            try:
                if sid not in markers:
                    atomic_write(marker, b"", mode=0o600)
                    continue
                if now_s - marker.lstat().st_mtime <= retention_s:
                    continue
                self.forget(sid)
                marker.unlink(missing_ok=True)
            except OSError:
                continue               # tried again on the next round
            removed.append(sid)
        return removed

    def load(self, strategy: str) -> dict[str, Any] | None:
        try:
            value = json.loads(read_regular(self._path(strategy), PLAN_CAP_BYTES))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None


# --- plan files ----------------------------------------------------------------------------------

def write_plan(path: str | Path, plan: Plan) -> None:
    """Save `plan` for `apply PLANFILE`: it replaces an older file, never a folder, FIFO or device
    (NotARegularFile), and a failed write leaves nothing behind."""
    atomic_write(Path(path), json.dumps(plan.to_json(), indent=1).encode() + b"\n", mode=0o600, files_only=True)


def read_plan(path: str | Path) -> Plan:
    try:
        return Plan.from_json(json.loads(read_regular(Path(path), PLAN_CAP_BYTES)))
    except FileNotFoundError:
        raise StateError(f"{path}: plan file not found") from None
    except NotARegularFile as exc:
        raise StateError(f"{exc}; give the file `quantlab plan --out FILE` wrote") from exc
    except OSError as exc:
        raise StateError(f"{path}: cannot read the plan file: {exc.strerror}") from exc
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise StateError(f"{path}: not a quantlab plan file ({exc}); create one with `quantlab plan --out FILE`") from exc
