"""What the adapter hands to the validation: the fleet's YAML files as bytes (`FleetFile`), the
strategy files it resolved and read (`StrategyFile`), and what it applies while reading them: which
files are YAML, how large a file may be, and what no fleet file may be (a Git LFS pointer).

The adapter (quantlab/edges/fleetfiles.py) reads the fleet directory or a checkout of a commit;
everything here is plain data, so that the validation stays pure.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

YAML_SUFFIXES = (".yaml", ".yml")

# Limits that keep a strange fleet directory from hanging or exhausting the controller (the others:
# MAX_VALUES_PER_FILE and MAX_DEPTH in yamldocs.py, MAX_PARAMS_BYTES in kinds.py).
MAX_FILE_BYTES = 16 * 2**20        # one YAML or strategy file; real ones are a few KiB

# What a file stored with Git LFS holds when git-lfs did not fetch it: a pointer, not the file.
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _lfs_pointer(data: bytes) -> bool:
    return data.startswith(LFS_POINTER) and len(data) < 1024


LFS_MESSAGE = ("is a Git LFS pointer, not the file itself: quantlab reads files as git stores them and never "
               "fetches LFS objects; commit this file without LFS (remove its pattern from .gitattributes)")


@dataclass(frozen=True)
class FleetFile:
    """One YAML file of the fleet, as the adapter that reads the fleet directory found it."""

    rel: str                       # its path below the fleet directory (posix)
    shown: str                     # how messages name it
    data: bytes | None = None
    problem: str | None = None     # why it could not be read (then there is no data)


@dataclass(frozen=True)
class StrategyFile:
    """A strategyFile as written in a Strategy, resolved and read by the adapter."""

    path: Path | None = None       # where its bytes are (what is uploaded to the workers)
    rel: str | None = None         # its canonical path below the fleet directory
    sha256: str | None = None
    problem: str | None = None     # why it cannot be used: the rest of "strategyFile 'x' ..."


def file_problem(data: bytes) -> str | None:
    """What is wrong with a fleet file's bytes whatever its kind (an LFS pointer), or None."""
    return LFS_MESSAGE if _lfs_pointer(data) else None
