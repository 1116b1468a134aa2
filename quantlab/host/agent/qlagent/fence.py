"""Controller fencing: every command that may change something here carries the term of the
controller that sent it (`"fence": {"lineage", "term"}`, the term of its leadership of the state
`lineage`). Each workdir remembers the highest term it has seen per lineage, and refuses a command
from a lower one: a controller that was deposed (frozen, cut off from its database) but does not
know it yet cannot start, stop or renew anything once a newer leader has reached this host.

A request without a fence (a controller of an earlier release) is not checked; a fence whose term is
null (a standby's read-only probe) is only answered with the highest term seen. The term is checked
and raised under the workdir's agent lock; the command then runs after it is released, and the
window in between is why a new leader starts nothing elsewhere until the previous term's leases are
surely over.
"""
import os

from .base import BadFile, parse_json, read_instance_file, write_json, _is_int
from .procs import lock_instance
from .protocol import MAX_TERM

FENCE_FILE = "fence.json"               # in WORKDIR/agent/: {lineage: highest term}
FENCE_LOCK_SECONDS = 2.0
MAX_LINEAGES = 16                       # states that ever sent commands here; the highest terms kept
LINEAGE_CAP = 100


def fence_of(request):
    """(lineage, term or None) the request carries, or None without a (well-formed) fence."""
    fence = request.get("fence")
    if not isinstance(fence, dict) or not isinstance(fence.get("lineage"), str):
        return None
    lineage, term = fence["lineage"][:LINEAGE_CAP], fence.get("term")
    return lineage, (term if _term(term) else None)


def _term(value):
    return _is_int(value) and 0 <= value <= MAX_TERM


def _read(path):
    try:
        found = read_instance_file(path)
        seen = parse_json(found[0]) if found is not None else {}
    except BadFile:
        seen = {}
    if not isinstance(seen, dict):
        return {}
    # A strategy runs as our user and can write this file: a term no controller could have sent is
    # not kept (the next admitted command writes the file anew).
    return {k: v for k, v in seen.items() if isinstance(k, str) and _term(v)}


def admit(workdir, request):
    """(refusal or None, highest term seen here for the request's lineage or None). A command from
    a term at or above the highest seen is admitted, and its term is remembered."""
    fence = fence_of(request)
    if fence is None:
        return None, None
    lineage, term = fence
    folder = os.path.join(workdir, "agent")
    path = os.path.join(folder, FENCE_FILE)
    if term is None:                       # read only: say what is known, change nothing
        return None, _read(path).get(lineage)
    lock, held = lock_instance(folder, FENCE_LOCK_SECONDS)
    if lock is None:
        return "the fence cannot be checked: %s" % held, None
    try:
        seen = _read(path)
        highest = seen.get(lineage)
        if highest is not None and term < highest:
            return ("refused: controller term %d is below term %d, which a newer leader of this state "
                    "(lineage %s) already used here; the sender was deposed" % (term, highest, lineage)), highest
        if highest != term:
            seen[lineage] = term
            kept = sorted(seen.items(), key=lambda item: item[1], reverse=True)[:MAX_LINEAGES]
            write_json(path, dict(kept), mode=0o400)      # read-only: no strategy rewrites it by accident
        return None, term
    finally:
        os.close(lock)
