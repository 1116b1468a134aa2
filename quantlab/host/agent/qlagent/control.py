"""`start`, `stop`, `pause`, `resume`: an instance's supervisor started, stopped or signalled,
under the instance's lock; old instance folders pruned."""
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

from .base import (
    APP,
    DISK_LOW_BYTES,
    LAUNCH_FIELDS,
    MAX_PROBLEMS,
    PROBLEM_CAP,
    clip,
    describe_error,
    disk_free_bytes,
    lease_limit,
    now_ms,
    open_append,
    remove_entry,
    write_atomic,
    write_json,
)
from .protocol import EXIT_MISSING, FINAL_STATES
from .procs import (
    PID_IDENTITY,
    busy,
    end_strays,
    instance_dir,
    live_pid,
    lock_budget,
    lock_instance,
    log_event,
    process_table,
    signal_group,
    strays,
    write_pid,
)
from .probe import instance_names, load_spec, pack_checkpoint, read_status, unpack_checkpoint, write_lease

# --- start / stop / pause / resume ------------------------------------------------------------------

def missing_files(request):
    workdir = request["workdir"]
    names = [request["file"]]
    if any("{runner}" in part for part in request["runner"]):
        names.append(request["runnerFile"])
    return [n for n in names if not os.path.isfile(os.path.join(workdir, n))]


def launched_as_asked(idir, request):
    """Whether the copy in `idir` was started with the launch `request` asks for."""
    try:
        running = load_spec(os.path.join(idir, "spec.json"))
    except ValueError:
        return False
    return all(running.get(name) == request.get(name) for name in LAUNCH_FIELDS)


def supervisor_app(workdir):
    """The agent copy a supervisor runs from: the one in its own workdir, so that nothing of another
    workdir (which may be removed with its worker) is needed by the copies of this one. The calls of a
    host go to one agent copy (the first worker's): it puts itself there when that one is missing."""
    own = os.path.join(workdir, "agent", os.path.basename(APP))
    if not os.path.isfile(APP) or os.path.abspath(own) == APP or os.path.isfile(own):
        return own if os.path.isfile(own) else APP       # (APP is a folder when run from the sources)
    try:
        with open(APP, "rb") as handle:
            data = handle.read()
        os.makedirs(os.path.dirname(own), mode=0o700, exist_ok=True)
        write_atomic(own, data, 0o755)
        return own
    except OSError:
        return APP                    # a full disk, say: this copy will do


def start(request, args):
    request["workdir"] = os.path.abspath(os.path.expanduser(request["workdir"]))
    # The copy's lease key goes to its supervisor through a pipe only: spec.json is in the strategy's reach.
    key = request.pop("leaseKey", None)
    if key is not None and not (isinstance(key, str) and re.fullmatch(r"[0-9a-f]{64}", key)):
        return {"result": "refused", "reason": "leaseKey is not 64 hex digits"}, 0
    request["leaseAuth"] = key is not None
    ttl = float(request.get("leaseTtlSeconds") or 0)
    if ttl > 0:
        _, refused = lease_limit(request.get("notAfter"))
        if refused:
            return {"result": "refused", "reason": refused}, 0
    missing = missing_files(request)
    if missing:
        return {"result": "missing", "missing": missing}, EXIT_MISSING
    free = disk_free_bytes(request["workdir"])
    if free is not None and free < DISK_LOW_BYTES:
        # A copy that cannot write its heartbeat, lease or logs would look dead: start nothing.
        return {"result": "refused", "reason": "the disk of %s is full (%d KB free): free space there"
                                               % (request["workdir"], free // 1024)}, 0
    idir = instance_dir(request["workdir"], request["strategy"])
    # A folder made by this start has no earlier copy (prune keeps a folder while strays of it live).
    fresh = not os.path.lexists(idir)
    lock, held = lock_instance(idir, lock_budget(request))
    if lock is None:
        return busy(held)
    problems = []                     # bookkeeping that failed; said in the answer, never fatal once spawned
    status, _ = read_status(idir, [])
    supervisor = live_pid(os.path.join(idir, "supervisor.pid"))
    same = status.get("epoch") == request["epoch"] and status.get("specHash") == request["specHash"]
    if supervisor is not None and same and status.get("state") not in FINAL_STATES \
            and launched_as_asked(idir, request):
        return {"result": "already-running", "pid": supervisor}, 0
    if supervisor is not None or live_pid(os.path.join(idir, "runner.pid")) is not None:
        why = "replaced by a new start (epoch %s)" % request["epoch"]
        stop_instance(idir, why, float(status.get("stopTimeoutSeconds") or 30), problems)
    if not fresh:
        # Nothing of an earlier copy may run beside the new one. (A scan reads every process's
        # environment: on a host of thousands of processes it is most of a start's work.)
        end_strays(idir)
    keep_restarts = status.get("epoch") == request["epoch"] and status.get("specHash") == request["specHash"]
    try:
        if os.path.islink(os.path.join(idir, "state")):
            remove_entry(os.path.join(idir, "state"))           # the checkpoint folder is a real folder
        os.makedirs(os.path.join(idir, "state"), mode=0o700, exist_ok=True)
        if request.get("checkpoint"):
            unpack_checkpoint(idir, request.pop("checkpoint"))   # a move: continue where it left off
        # A stopped copy's pid files name nothing: the new supervisor must not take them for its own.
        for stale in ("heartbeat.json", "runner.pid", "runner.pid" + PID_IDENTITY, "supervisor.pid",
                      "supervisor.pid" + PID_IDENTITY, "control.json"):
            remove_entry(os.path.join(idir, stale))
        limit = None
        if ttl > 0:
            # Checked again: stopping a copy it replaces may have taken a while.
            limit, refused = lease_limit(request.get("notAfter"))
            if refused:
                return {"result": "refused", "reason": refused}, 0
        write_json(os.path.join(idir, "spec.json"), request)
        write_lease(idir, request["epoch"], ttl, limit)
        write_json(os.path.join(idir, "status.json"), {
            "state": "starting", "epoch": request["epoch"], "specHash": request["specHash"],
            "restarts": status.get("restarts", 0) if keep_restarts else 0, "startedAt": now_ms(),
            "paused": bool(request.get("paused")),
            "stopTimeoutSeconds": request["scheduling"]["stopTimeoutSeconds"]})
        log = open_append(os.path.join(idir, "supervisor.log"))
        try:
            child = subprocess.Popen([sys.executable, "-I", "-S", supervisor_app(request["workdir"]), "supervise", idir],
                                     stdin=subprocess.PIPE if key else subprocess.DEVNULL, stdout=log, stderr=log,
                                     close_fds=True, start_new_session=True, cwd=idir)
        finally:
            try:
                os.close(log)
            except OSError:
                pass
    except OSError as exc:
        # Nothing runs yet (a full disk, a folder the strategy made unwritable): a clean refusal.
        return {"result": "refused", "reason": "cannot prepare the instance folder: %s" % describe_error(exc)}, 0
    if key:
        hand_over_key(child, key, problems)
    # From here on a copy runs: the answer must say "started" whatever else fails (a full disk, an
    # events.log the strategy made unwritable), or the controller would believe nothing runs here.
    # The supervisor writes supervisor.pid itself as soon as it runs, and keeps it.
    bookkeeping(problems, "supervisor.pid", write_pid, os.path.join(idir, "supervisor.pid"), child.pid)
    bookkeeping(problems, "events.log", log_event, idir, "start", "epoch %s" % request["epoch"],
                epoch=request["epoch"])
    answer = {"result": "started", "pid": child.pid}
    if problems:
        answer["problems"] = [clip(p, PROBLEM_CAP) for p in problems[:MAX_PROBLEMS]]
    return answer, 0


def hand_over_key(child, key, problems):
    """The key, then end of input: the supervisor reads it before anything else (a supervisor that
    gets none takes no renewal, and its strategy stops at the end of the lease this start granted)."""
    try:
        child.stdin.write(key.encode("ascii") + b"\n")
        child.stdin.close()
    except OSError as exc:
        problems.append("the lease key did not reach the supervisor: %s; it stops when this start's lease "
                        "runs out" % describe_error(exc))


def bookkeeping(problems, name, action, *args, **kwargs):
    """One write the agent keeps for itself (a pid file, an event, a status): a failure is added to
    `problems` (for the answer) instead of raised, once the real work has been done."""
    try:
        action(*args, **kwargs)
    except Exception as exc:          # noqa: BLE001 - a full disk, a directory in the way, anything
        problems.append("%s: cannot write it: %s" % (name, describe_error(exc)))


def wait_gone(pidfile, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if live_pid(pidfile) is None:
            return True
        time.sleep(0.02)
    return live_pid(pidfile) is None


def supervisor_children(keeper):
    """The supervisor proper below a keeper (or nothing, for a supervisor of an earlier release)."""
    found = []
    for pid, (ppid, state) in process_table().items():
        if ppid != keeper or state in ("Z", "X"):
            continue
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                if b"supervise" in handle.read(65536).split(b"\0"):
                    found.append(pid)
        except OSError:
            continue
    return found


def stop_instance(idir, reason, grace, problems):
    """Ask the supervisor to stop (st_exit runs, SIGKILL after the grace); clean up if it is gone.
    Writes that fail are added to `problems`: they never keep the copy from being stopped."""
    # Only tells the supervisor why; without it the stop still happens ("stopped by signal").
    bookkeeping(problems, "control.json", write_json, os.path.join(idir, "control.json"), {"stop": reason})
    supervisor_pid = os.path.join(idir, "supervisor.pid")
    supervisor = live_pid(supervisor_pid)
    if supervisor is not None:
        try:
            os.kill(supervisor, signal.SIGTERM)
        except OSError:
            pass
        if wait_gone(supervisor_pid, grace + 5):
            return "stopped"
        # Stuck past the grace: kill the supervisor proper and the runner; its keeper (still alive, so
        # every process the strategy started is below it) then kills the rest and exits.
        for pid in supervisor_children(supervisor):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:               # gone meanwhile
                pass
        stuck_runner = live_pid(os.path.join(idir, "runner.pid"))
        if stuck_runner is not None:
            signal_group(stuck_runner, signal.SIGKILL)
        if not wait_gone(supervisor_pid, 5):
            signal_group(supervisor, signal.SIGKILL)
    runner = live_pid(os.path.join(idir, "runner.pid"))
    if runner is not None:                      # no supervisor to ask: do its job here
        signal_group(runner, signal.SIGTERM)
        if not wait_gone(os.path.join(idir, "runner.pid"), grace):
            signal_group(runner, signal.SIGKILL)
            wait_gone(os.path.join(idir, "runner.pid"), 5)
        bookkeeping(problems, "events.log", log_event, idir, "stopped", reason + " (its supervisor was gone)")
    left = end_strays(idir)
    status, usable = read_status(idir, [])
    if status.get("state") not in FINAL_STATES or not usable:
        status.update({"state": "stopped", "reason": reason, "stoppedAt": now_ms()})
        bookkeeping(problems, "status.json", write_json, os.path.join(idir, "status.json"), status)
    if left:
        bookkeeping(problems, "events.log", log_event, idir, "instance-problem",
                    "processes %s of this strategy survived SIGKILL" % left)
    return "stopped" if supervisor is not None or runner is not None else "not-running"


def stop(request, args):
    idir = instance_dir(request["workdir"], request["strategy"])
    if not os.path.isdir(idir):
        return {"result": "not-running"}, 0
    lock, held = lock_instance(idir, lock_budget(request))
    if lock is None:
        return busy(held)
    status, _ = read_status(idir, [])
    epoch = request.get("epoch")
    if epoch is not None and status.get("epoch") not in (None, epoch):
        # A newer copy runs here now: never stop it on behalf of an older one.
        return {"result": "epoch-mismatch", "running": status.get("epoch")}, 0
    # The longer of the two: the copy may have been started with more time for st_exit than asked now.
    grace = max(float(request.get("stopTimeoutSeconds") or 0), float(status.get("stopTimeoutSeconds") or 0)) or 30.0
    problems = []
    answer = {"result": stop_instance(idir, request.get("reason") or "stopped by the controller", grace, problems)}
    if request.get("checkpoint"):                # a move: the new worker gets the final state
        answer["checkpoint"] = pack_checkpoint(idir)
    if problems:
        answer["problems"] = [clip(p, PROBLEM_CAP) for p in problems[:MAX_PROBLEMS]]
    os.close(lock)
    if isinstance(request.get("keep"), list):    # the controller names what is placed on this worker
        keep = set(request["keep"]) | {request["strategy"]}
        answer["pruned"] = prune_instances(request["workdir"], keep, request.get("keepStopped", KEEP_STOPPED))
    return answer, 0


# Stopped instance folders (logs, final checkpoint) kept per worker beyond those placed there.
KEEP_STOPPED = 20


def prune_instances(workdir, keep, retain):
    """Remove the folders of stopped instances beyond the newest `retain`: never one in `keep`,
    never one with a live supervisor, runner or stray process, never one whose lock is held. The
    names removed."""
    root = os.path.join(os.path.abspath(workdir), "instances")
    stopped = []
    for name in instance_names(workdir):
        idir = os.path.join(root, name)
        try:
            if name in keep or not stat.S_ISDIR(os.lstat(idir).st_mode):
                continue
        except OSError:
            continue
        if live_pid(os.path.join(idir, "supervisor.pid")) or live_pid(os.path.join(idir, "runner.pid")):
            continue
        status, _ = read_status(idir, [])
        stopped_at = status.get("stoppedAt")
        stopped.append((stopped_at if isinstance(stopped_at, (int, float)) else 0, name))
    removed = []
    for _, name in sorted(stopped, reverse=True)[max(0, int(retain)):]:
        idir = os.path.join(root, name)
        if strays(idir):                       # the folder marks them: a start here ends them first
            continue
        lock, _ = lock_instance(idir, 0)
        if lock is None:
            continue
        try:
            shutil.rmtree(idir)                 # does not follow the links a strategy may have left
            removed.append(name)
        except OSError:
            pass
        finally:
            os.close(lock)
    return removed


def set_paused(request, paused):
    idir = instance_dir(request["workdir"], request["strategy"])
    lock, held = lock_instance(idir, lock_budget(request))
    if lock is None:
        return busy(held)
    supervisor = live_pid(os.path.join(idir, "supervisor.pid"))
    if supervisor is None:
        return {"result": "not-running"}, 0
    os.kill(supervisor, signal.SIGUSR1 if paused else signal.SIGUSR2)
    want = "paused" if paused else "running"
    deadline = time.monotonic() + 10
    status = {}
    while time.monotonic() < deadline:
        status, _ = read_status(idir, [])
        if bool(status.get("paused")) == paused and status.get("state") in (want, "restarting", "starting"):
            return {"result": want}, 0
        time.sleep(0.02)
    return {"result": "unconfirmed", "state": status.get("state")}, 1
