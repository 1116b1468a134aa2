"""`probe` and `checkpoints`: what runs in each instance folder (status, heartbeat, lease, events),
lease renewals, and the checkpoint folders the controller copies."""
import hashlib
import json
import os
import stat
import sys
import time

try:                    # a Python built without zlib still probes, starts and stops; checkpoints say why not
    import zlib
except ImportError:
    zlib = None

from .base import (
    DISK_LOW_BYTES,
    BadFile,
    EVENTS_TAIL_BYTES,
    HEARTBEAT_FIELDS,
    LEASE_FIELDS,
    MAX_PROBLEMS,
    PROBLEM_CAP,
    SPEC_FILE_CAP,
    SPEC_IDS,
    SPEC_LEASE,
    STATUS_FIELDS,
    _is_number,
    boot_id,
    boottime,
    clip,
    describe_error,
    disk_free_bytes,
    file_kind,
    lease_limit,
    load_checked,
    now_ms,
    parse_json,
    read_instance_file,
    read_json,
    write_json,
)
from .fence import admit
from .protocol import FINAL_STATES, SUPERVISOR_STATES
from .procs import host_containment, live_pid

# --- probe ----------------------------------------------------------------------------------------

def host_facts():
    facts = {"cpus": os.cpu_count() or 1, "time": now_ms(), "python": "%d.%d.%d" % sys.version_info[:3],
             "boottime": boottime(), "bootId": boot_id()}
    try:
        facts["loadavg"] = list(os.getloadavg())
    except OSError:
        facts["loadavg"] = None
    facts["memFreeMb"] = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    facts["memFreeMb"] = int(line.split()[1]) // 1024
                    break
    except OSError:
        pass
    return facts


def find_program(program):
    if os.sep in program:
        return program if os.access(program, os.X_OK) else None
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(folder or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def program_version(program, cache_path):
    """`program --version`, cached by the binary's identity so a probe rarely runs it."""
    path = find_program(program)
    if path is None:
        return {"program": program, "path": None, "version": None}
    st = os.stat(path)
    key = "%s:%d:%d" % (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    cache = read_json(cache_path, {})
    if not isinstance(cache, dict):
        cache = {}
    if key not in cache:
        import subprocess              # here: most probes find the version cached, and start nothing
        try:
            done = subprocess.run([path, "--version"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  timeout=10, stdin=subprocess.DEVNULL)
            cache[key] = done.stdout.decode(errors="replace").strip().splitlines()[0] if done.stdout else None
        except (OSError, subprocess.SubprocessError, IndexError):
            cache[key] = None
        try:
            write_json(cache_path, cache)
        except OSError:
            pass
    return {"program": program, "path": path, "version": cache[key]}



KNOWN_STATES = SUPERVISOR_STATES


def read_status(idir, problems):
    """(status fields, usable): the supervisor's status.json, checked; not usable when it is there
    but cannot be read (the supervisor rewrites it within a second)."""
    status, _, found = load_checked(os.path.join(idir, "status.json"), STATUS_FIELDS)
    problems.extend(found)
    if status is not None and status.get("state", "stopped") not in KNOWN_STATES:
        problems.append("status.json: state: %s is not a known state" % clip(json.dumps(status["state"]), 40))
        status = None
    usable = status is not None or not found
    status = status or {}
    if "epoch" not in status or "specHash" not in status:
        # Which copy this is, from the start request, when status.json cannot tell.
        spec, _, found = load_checked(os.path.join(idir, "spec.json"), SPEC_IDS, SPEC_FILE_CAP)
        problems.extend(found)
        for name, value in (spec or {}).items():
            status.setdefault(name, value)
    return status, usable


def read_heartbeat(path, problems=None):
    """The runner's last report, with its age, or None when there is none that can be used."""
    beat, mtime, found = load_checked(path, HEARTBEAT_FIELDS)
    if problems is not None:
        problems.extend(found)
    if beat is None:
        return None
    if found:                            # a report with wrong fields counts as no heartbeat
        return {name: beat[name] for name in ("errorCount", "lastError") if name in beat}
    # For people only (status shows it): wall clock against the file's mtime, so a clock step shows
    # here. Health is judged by the supervisor on its monotonic clock (HealthWatch), never from this.
    beat["ageMs"] = max(0, int((time.time() - mtime) * 1000))
    return beat


def whole(value):
    """Milliseconds as the controller reads them: an int, or None."""
    return None if value is None else int(value)


def describe_instance(idir, strategy, events_since):
    problems = []
    status, status_usable = read_status(idir, problems)
    supervisor = live_pid(os.path.join(idir, "supervisor.pid"), problems)
    runner = live_pid(os.path.join(idir, "runner.pid"), problems)
    state = status.get("state", "stopped")
    reason = status.get("reason")
    if not status_usable and supervisor is not None:
        state, reason = "unknown", "its status.json cannot be read; the supervisor runs and rewrites it"
    elif supervisor is None and state not in FINAL_STATES:
        if runner is not None:
            state, reason = "orphaned", "the supervisor is gone but the runner still runs"
        else:
            state, reason = "stopped", "the supervisor is not running (host restarted, or it was killed)"
    beat = read_heartbeat(os.path.join(idir, "heartbeat.json"), problems)
    if beat is not None and state in FINAL_STATES:
        # The last life's report: its errors explain an `error`; its age and beats are history.
        beat = {"errorCount": beat.get("errorCount", 0), "lastError": beat.get("lastError")}
    beat = beat or {}
    lease, _, found = load_checked(os.path.join(idir, "lease.json"), LEASE_FIELDS)
    problems.extend(found)
    lease = lease or {}
    out = {
        "strategy": strategy, "epoch": status.get("epoch"), "specHash": status.get("specHash"),
        "status": state, "alive": supervisor is not None or runner is not None, "reason": reason,
        "startedAt": whole(status.get("startedAt")), "stoppedAt": whole(status.get("stoppedAt")),
        "restarts": status.get("restarts", 0), "exitCode": status.get("exitCode"),
        "errorCount": beat.get("errorCount", 0), "lastError": beat.get("lastError"),
        "beats": beat.get("beats"), "heartbeatAgeMs": beat.get("ageMs"),
        "leaseLeftSeconds": (round(lease["deadline"] - boottime(), 3)
                             if "deadline" in lease and state not in FINAL_STATES else None),
    }
    if status.get("containment"):
        out["containment"] = status["containment"]
    # The lease its supervisor enforces is the one it was started with: the controller restarts a
    # copy whose TTL is not the fleet's.
    launched, _, found = load_checked(os.path.join(idir, "spec.json"), SPEC_LEASE, SPEC_FILE_CAP)
    problems.extend(found)
    if launched and launched.get("leaseTtlSeconds") is not None:
        out["leaseTtlSeconds"] = launched["leaseTtlSeconds"]
    if events_since is not None:
        out["events"] = read_events(idir, events_since, problems)
    if problems:
        out["problems"] = [clip(p, PROBLEM_CAP) for p in problems[:MAX_PROBLEMS]]
    return out


def clean_event(event):
    """An events.log line as the controller may read it: `t` and `event` well-typed, only plain
    values, text clipped; None for anything else (the strategy can write that file too)."""
    if not isinstance(event, dict) or not _is_number(event.get("t")) or not isinstance(event.get("event"), str):
        return None
    out = {}
    for key, value in list(event.items())[:20]:
        if isinstance(value, str):
            out[clip(str(key), 40)] = clip(value)
        elif value is None or isinstance(value, (bool, int)) or _is_number(value):
            out[clip(str(key), 40)] = value
    return out


def read_events(idir, since, problems=None):
    path = os.path.join(idir, "events.log")
    try:
        if os.lstat(path).st_mtime * 1000 < since:
            return []
        found = read_instance_file(path, EVENTS_TAIL_BYTES, tail=True)
    except BadFile as exc:
        if problems is not None:
            problems.append("events.log: %s" % exc)
        return []
    except OSError:
        return []
    if found is None:
        return []
    lines = found[0].splitlines()
    if len(found[0]) >= EVENTS_TAIL_BYTES:
        lines = lines[1:]                    # the first line is cut
    out = []
    for raw in lines[-200:]:
        try:
            event = clean_event(json.loads(raw))
        except (ValueError, RecursionError):
            continue
        if event is not None and event["t"] > since:
            out.append(event)
    return out


CHECKPOINT_CAP_BYTES = 1024 * 1024
CHECKPOINT_FILE_CAP = 16 * 1024 * 1024        # read from disk, before compression
CHECKPOINT_MAX_FILES = 10000
CHECKPOINT_RAW_CAP = 64 * 1024 * 1024         # all files together, before compression (read every round)


class CheckpointTooLarge(Exception):
    pass


def checkpoint_files(idir):
    """(relative path, bytes) of each regular file in the instance's checkpoint folder
    (QUANTLAB_STATE_DIR), in path order; None when it is not a plain folder (it then stays on the
    host only). Links, FIFOs and other non-regular entries are skipped without being opened, and
    half-written files (".tmp" in the name) left out. Raises CheckpointTooLarge."""
    root = os.path.join(idir, "state")
    try:
        if not stat.S_ISDIR(os.lstat(root).st_mode):
            return None
    except FileNotFoundError:
        return []
    except OSError:
        return None
    found, total = [], 0
    for folder, dirs, names in os.walk(root):   # os.walk does not enter symlinked folders
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            if ".tmp" in name:
                continue
            if len(found) >= CHECKPOINT_MAX_FILES:
                raise CheckpointTooLarge()
            try:
                read = read_instance_file(path, min(CHECKPOINT_FILE_CAP, CHECKPOINT_RAW_CAP - total))
            except BadFile as exc:
                if str(exc).startswith("too large"):
                    raise CheckpointTooLarge()
                continue                        # a link, a FIFO, a device: not state
            if read is not None:
                total += len(read[0])
                found.append((os.path.relpath(path, root), read[0]))
    return found


def checkpoint_hash(files):
    digest = hashlib.sha256()
    for rel, data in files:
        digest.update(("%s\0%d\0" % (rel, len(data))).encode("utf-8", "surrogateescape"))
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def pack_checkpoint(idir, files=None):
    """The instance's checkpoint folder as {"files": {relative path: base64 of zlib}, "hash", "t"},
    or None when it cannot be copied (not a plain folder, or larger than the cap compressed)."""
    import base64                      # here: only a checkpoint copy or a stop needs it
    try:
        files = checkpoint_files(idir) if files is None else files
    except CheckpointTooLarge:
        return None
    if files is None:
        return None
    packed, total = {}, 0
    for rel, data in files:
        if zlib is None:
            return None                         # as if too large: it stays on the host
        squeezed = zlib.compress(data)
        total += len(squeezed)
        if total > CHECKPOINT_CAP_BYTES:
            return None
        packed[rel] = base64.b64encode(squeezed).decode()
    return {"files": packed, "hash": checkpoint_hash(files), "t": now_ms()}


def copy_checkpoints(request, args):
    """Checkpoints the controller asks for, in a call of their own: for each instance, its folder
    comes back only when it differs from the controller's copy (`have`, the hash of that copy)."""
    answer = {"workers": {}}
    for wid, asked in sorted((request.get("workers") or {}).items()):
        workdir, out = asked.get("workdir"), {}
        for name, want in sorted((asked.get("instances") or {}).items()):
            try:
                out[name] = checkpoint_of(os.path.join(workdir, "instances", name), want)
            except Exception as exc:      # noqa: BLE001 - one instance's trouble is its own
                out[name] = {"result": "error", "error": clip(describe_error(exc))}
        answer["workers"][wid] = out
    return answer


def checkpoint_of(idir, want):
    try:
        if not stat.S_ISDIR(os.lstat(idir).st_mode):
            return {"result": "missing"}
    except FileNotFoundError:
        return {"result": "missing"}
    status, _ = read_status(idir, [])
    if status.get("epoch") != want.get("epoch"):
        return {"result": "other-epoch", "epoch": status.get("epoch")}
    try:
        files = checkpoint_files(idir)
    except CheckpointTooLarge:
        return {"result": "too-large"}
    if files is None:
        return {"result": "too-large"}
    if checkpoint_hash(files) == want.get("have"):
        return {"result": "unchanged"}
    packed = pack_checkpoint(idir, files)
    return {"result": "copied", "checkpoint": packed} if packed is not None else {"result": "too-large"}


def unpack_checkpoint(idir, checkpoint):
    """Put a checkpoint back into the instance's state folder; paths stay inside it."""
    import base64
    import shutil
    root = os.path.join(idir, "state")
    # The checkpoint replaces whatever an earlier placement left here (and any symlink in it).
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root, mode=0o700)
    for rel, data in sorted((checkpoint or {}).get("files", {}).items()):
        rel = os.path.normpath(rel)
        if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
            continue
        target = os.path.join(root, rel)
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as handle:
            if zlib is None:
                raise RuntimeError("this host's Python has no zlib module: cannot restore a checkpoint")
            handle.write(zlib.decompress(base64.b64decode(data)))


def write_lease(idir, epoch, ttl, limit, not_after=None, proof=None):
    """deadline: on this host's boot-time clock, never past the request's not-after + TTL (what a
    supervisor of an earlier release enforces); expiresAt: the same moment in wall-clock ms, for the
    strategy (ctx.leaseExpiresAt). notAfter and proof: a renewal's, which a supervisor that holds
    its copy's key checks before it takes a later deadline. No TTL: no lease, no fencing."""
    lease = {"epoch": epoch, "expiresAt": None}
    if ttl > 0:
        now = boottime()
        deadline = min(now + ttl, limit + ttl)
        lease.update(deadline=deadline, expiresAt=now_ms() + int((deadline - now) * 1000))
    if proof is not None:
        lease.update(notAfter=not_after, proof=proof)
    write_json(os.path.join(idir, "lease.json"), lease)


def renew_lease(idir, epoch, ttl, not_after, proof=None):
    """Extend the lease of the copy with this epoch: None when renewed, else why not. Only the copy
    running here, only a lease that has not run out yet (expired stays expired: its supervisor may
    not have noticed yet, and the controller may already start a replacement elsewhere), and only
    when the request is not late (checked right before writing: this agent may have been frozen)."""
    status, _ = read_status(idir, [])
    if status.get("epoch") != epoch:
        return "it runs epoch %s here, not %s" % (status.get("epoch"), epoch)
    if status.get("state") in FINAL_STATES:
        return "it is %s" % status["state"]
    if live_pid(os.path.join(idir, "supervisor.pid")) is None:
        return "its supervisor is not running"
    lease, _, problems = load_checked(os.path.join(idir, "lease.json"), LEASE_FIELDS)
    if problems or lease is None or lease.get("epoch") != epoch:
        # Fail closed: without the lease this copy holds, there is no telling whether it ran out.
        return "its lease cannot be checked (%s)" % (
            "; ".join(problems) if problems else "lease.json is missing" if lease is None
            else "lease.json holds epoch %s's lease" % lease.get("epoch"))
    if "deadline" in lease:               # no deadline: started without fencing, nothing can run out
        overdue = boottime() - lease["deadline"]
        if overdue > 0:
            return ("its lease ran out at %.3f on the boot-time clock, %.3fs ago; a lease that ran out "
                    "is never renewed" % (lease["deadline"], overdue))
    limit, late = lease_limit(not_after)
    if limit is None:
        return late
    if proof is None and load_spec(os.path.join(idir, "spec.json")).get("leaseAuth"):
        # Its supervisor takes only renewals that prove they came from the controller.
        return "the request carries no proof of renewal for it"
    write_lease(idir, epoch, ttl, limit, not_after, proof)
    return None


def describe_unreadable(name, why, alive=True):
    # "unknown": the planner leaves it alone (acting blind could run it twice); only this instance.
    return {"strategy": name, "status": "unknown", "alive": alive, "reason": clip(why)}


def instance_names(workdir):
    try:
        return sorted(os.listdir(os.path.join(workdir, "instances")))
    except OSError:
        return []


def probe(request, args):
    """Renewals first, for every worker of the request, and only then everything else: describing
    instances, `node --version` (up to 10 s after a runtime upgrade) and credentials must never make a
    renewal late."""
    ttl = request.get("leaseTtlSeconds")
    not_after = request.get("notAfter")
    answer = {"host": host_facts(), "workers": {}}
    renewals = request.get("renew") or {}
    if ttl is not None and renewals:
        _, refused = lease_limit(not_after)
        if refused:                   # said once for the host; every renewal below is refused too
            answer["host"]["renewRefused"] = refused
    workers = []
    for spec in request.get("workers", []):
        wid, workdir = spec["id"], os.path.abspath(os.path.expanduser(spec["workdir"]))
        worker = {"workdir": workdir, "instances": {}, "renewed": [], "refused": {}}
        asked = renewals.get(wid) or {}
        fenced, worker["fence"] = admit(workdir, request)
        if fenced is not None:
            worker["fenced"] = fenced
            worker["refused"] = {name: clip(fenced) for name in sorted(asked)}
        else:
            proofs = (request.get("proofs") or {}).get(wid)
            renew_worker(workdir, asked, ttl, not_after, worker, proofs if isinstance(proofs, dict) else {})
        workers.append((wid, spec, worker))
    containment = host_containment()
    cache = None
    for wid, spec, worker in workers:
        workdir = worker["workdir"]
        if cache is None:
            cache = os.path.join(workdir, "agent", "versions.json")
        worker["containment"] = containment
        free = disk_free_bytes(workdir)
        worker["diskFreeMb"] = None if free is None else free // 2 ** 20
        worker["diskLow"] = free is not None and free < DISK_LOW_BYTES      # no new copy starts here
        worker["runtime"] = program_version(spec.get("program") or "node", cache)
        try:
            worker["credentials"] = sorted(n[:-4] for n in os.listdir(os.path.join(workdir, "secrets"))
                                           if n.endswith(".env"))
        except OSError:
            worker["credentials"] = []
        since = (request.get("eventsSince") or {}).get(wid)
        root = os.path.join(workdir, "instances")
        for name in instance_names(workdir):
            worker["instances"][name] = probe_instance(os.path.join(root, name), name, since)
        answer["workers"][wid] = worker
    answer["host"]["answeredAt"] = now_ms()
    return answer


def renew_worker(workdir, renew, ttl, not_after, worker, proofs=None):
    """The renewals asked for one worker: each id goes to `renewed` or, with why, to `refused`.
    Whatever goes wrong with one instance is that instance's alone."""
    present = set(instance_names(workdir))
    for name in sorted(renew):
        idir = os.path.join(workdir, "instances", name)
        try:
            if ttl is None:
                why = "the request carries no leaseTtlSeconds"
            elif name not in present or not stat.S_ISDIR(os.lstat(idir).st_mode):
                why = "no such instance here"
            else:
                proof = (proofs or {}).get(name)
                why = renew_lease(idir, renew[name], float(ttl), not_after, proof if isinstance(proof, str) else None)
        except Exception as exc:          # noqa: BLE001 - disk full, a file half gone, a bug: say so, go on
            why = "the agent could not renew it: %s" % describe_error(exc)
        if why is None:
            worker["renewed"].append(name)
        else:
            worker["refused"][name] = clip(why)


def probe_instance(idir, name, since):
    """Describe one instance of a probe. Whatever goes wrong here is this instance's alone: the
    host's answer never fails because of one instance."""
    try:
        if not stat.S_ISDIR(os.lstat(idir).st_mode):
            described = describe_unreadable(name, "not an instance folder", alive=False)
            described["problems"] = ["%s: not a directory (%s)" % (name, file_kind(os.lstat(idir).st_mode))]
            return described
        return describe_instance(idir, name, since)
    except Exception as exc:              # noqa: BLE001 - disk full, a file half gone, a bug: say so, go on
        return describe_unreadable(name, "the agent could not read it: %s: %s" % (type(exc).__name__, exc))


def load_spec(path):
    """spec.json as the supervisor needs it (written by `start`, but in a folder a strategy can write)."""
    try:
        found = read_instance_file(path, SPEC_FILE_CAP)
        spec = parse_json(found[0]) if found is not None else None
    except BadFile as exc:
        raise ValueError("spec.json: %s" % exc)
    if not isinstance(spec, dict) or not isinstance(spec.get("scheduling"), dict):
        raise ValueError("spec.json: not the spec of a start request")
    if not _is_number(spec.get("heartbeatMs")) or spec["heartbeatMs"] <= 0:
        raise ValueError("spec.json: heartbeatMs is not a number > 0")
    if not isinstance(spec.get("runner"), list) or not all(isinstance(p, str) for p in spec["runner"]):
        raise ValueError("spec.json: runner is not a list of strings")
    return spec
