"""Plan files: `quantlab plan --out FILE` writes one, `quantlab apply FILE` reads it back."""
from __future__ import annotations

import json
from pathlib import Path

from .atomicfile import MiB, NotARegularFile, atomic_write, read_regular
from quantlab.core.plan import Plan
from .store import StateError

PLAN_CAP_BYTES = 64 * MiB


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
