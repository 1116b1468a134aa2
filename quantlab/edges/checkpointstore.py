"""The controller's copies of the strategies' checkpoints, one file per strategy, and the check a
copy passes before it is kept (a host's answer is hostile input).
"""
from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
import threading
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from .atomicfile import MiB, atomic_write, fsync_dir, read_regular

# What the controller accepts of one checkpoint a host sends: compressed (as the agent caps it) and
# once decompressed (a small compressed file may expand a thousandfold).
CHECKPOINT_COMPRESSED_CAP = 1 * MiB
CHECKPOINT_EXPANDED_CAP = 64 * MiB
# The most of a kept copy read back (as much as a plan file).
COPY_CAP_BYTES = 64 * MiB

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
            value = json.loads(read_regular(self._path(strategy), COPY_CAP_BYTES))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None
