"""The controller–agent protocol, written down once. Standard library only: the agent imports it,
and so does the controller (quantlab.host.agent.qlagent.protocol), which imports nothing else of
the agent.

A call is `python3 -I -S agent.pyz COMMAND` with one JSON request on stdin and one JSON answer on
stdout (exit 0), or EXIT_MISSING (the files the request names must be uploaded first), or
EXIT_BAD_REQUEST. The shapes, by command:

probe        {"workers": [{"id", "workdir", "program"}], "eventsSince": {worker: ms},
              "renew": {worker: {strategy: epoch}}, "proofs": {worker: {strategy: proof}},
              "leaseTtlSeconds", "notAfter": {"bootId", "boottime"}}
          -> {"host": {"cpus", "time", "boottime", "bootId", "loadavg", "memFreeMb", "answeredAt",
                       "renewRefused"?}, "workers": {worker: {"instances": {strategy: INSTANCE},
                       "renewed": [strategy], "refused": {strategy: why}, ...}}}
              INSTANCE: {"strategy", "epoch", "specHash", "status" (INSTANCE_STATUSES), "alive",
                         "reason", "restarts", "events", "problems", "launched", ...}
start        {"worker", "workdir", "strategy", "epoch", "specHash", "file", "runnerFile", "runner",
              "params", "heartbeatMs", "scheduling", "region", "proxy", "account", "leaseTtlSeconds",
              "paused", "notAfter", "checkpoint"?, "leaseKey"?}  -> {"result": START_RESULTS, ...}
stop         {"workdir", "strategy", "epoch", "stopTimeoutSeconds", "reason", "checkpoint", "keep"}
                                                           -> {"result": STOP_RESULTS, "checkpoint"?, ...}
pause/resume {"workdir", "strategy", "epoch"}              -> {"result": ...}
logs         {"workdir", "strategy", "lines", "follow", "since"?, "grep"?, "cpuSeconds"?}
                                                           -> the output's bytes (not JSON)
checkpoints  {"workers": {worker: {"workdir", "instances": {strategy: {"epoch", "have"}}}}}
          -> {"workers": {worker: {strategy: {"result": CHECKPOINT_RESULTS, "checkpoint"?, ...}}}}
supervise    INSTANCE_DIR (started by `start`, never by the controller)
serve        answers many of the calls above over one channel, each framed (see serve.py)

probe, start, stop, pause and resume may carry "fence": {"lineage", "term"}, the sending controller's
leadership term of its state (see fence.py): a term below the highest the workdir has seen for that
lineage is refused — start/stop/pause/resume answer {"result": "fenced", "reason", "fence": highest},
a probe refuses that worker's renewals and says "fenced" — and every probe worker reports
"fence": the highest term seen there (a null term asks without raising it).

Leases are renewed only by the controller. `start` hands the instance's key ("leaseKey", hex) to its
supervisor through a pipe, never through a file the strategy could read; each renewal carries a proof
made with that key over the epoch and the request's not-after, which the agent writes into lease.json
and the supervisor checks before it takes a later deadline (see lease_proof). A strategy, which can
rewrite lease.json at will, can at most replay a proof it was given, whose not-after has passed.
"""

import hashlib
import hmac

EXIT_MISSING = 3        # files the request names are not on the host: upload them, then retry
# Controller terms are small integers (one more per change of leader). A workdir keeps none above
# MAX_TERM (what JSON carries exactly); a controller follows none above FOLLOWED_TERM: a term a host
# reports beyond it was written there by something else (a strategy runs as the agent's user) and is
# that worker's problem, never every worker's.
MAX_TERM = 2 ** 53 - 1
FOLLOWED_TERM = 2 ** 31 - 1
EXIT_BAD_REQUEST = 4

# `serve` (serve.py): the hello it writes first names this version; a header line (request or
# answer) longer than SERVE_MAX_HEADER means the stream is not framed as ours.
SERVE_VERSION = 1
SERVE_MAX_HEADER = 4096

COMMANDS = ("probe", "start", "stop", "pause", "resume", "logs", "checkpoints", "serve", "supervise")
# Commands that change something on the host carry the controller's term and are checked against it
# (see fence.py); a probe carries one too, checked per worker before its renewals.
FENCED_COMMANDS = ("start", "stop", "pause", "resume")

# What a supervisor writes in status.json ("state"); the final ones end it.
SUPERVISOR_STATES = ("starting", "running", "paused", "restarting", "stopping", "stopped", "error")
FINAL_STATES = ("stopped", "error")
# What a probe reports per instance: a supervisor's state, or "orphaned" (its supervisor is gone,
# its runner runs on) or "unknown" (the folder cannot be read: the controller leaves it alone).
INSTANCE_STATUSES = SUPERVISOR_STATES + ("orphaned", "unknown")

START_RESULTS = ("started", "already-running", "busy", "missing", "refused", "unconfirmed", "fenced")
STOP_RESULTS = ("stopped", "not-running", "epoch-mismatch", "busy", "fenced")
PAUSE_RESULTS = ("paused", "running", "not-running", "unconfirmed", "busy", "fenced")
CHECKPOINT_RESULTS = ("unchanged", "copied", "too-large", "other-epoch", "missing", "error")
RESULTS = {"start": START_RESULTS, "stop": STOP_RESULTS, "pause": PAUSE_RESULTS, "resume": PAUSE_RESULTS}

# What a request must hold, by command, and of which JSON type. Everything else a command reads has
# a default; a request without these is refused (EXIT_BAD_REQUEST) before anything is touched.
TEXT, WHOLE, NUMBER, OBJECT, LIST = "text", "a whole number", "a number", "an object", "a list"
_INSTANCE = {"workdir": TEXT, "strategy": TEXT}
REQUEST_FIELDS = {
    "probe": {},
    "start": dict(_INSTANCE, worker=TEXT, epoch=WHOLE, specHash=TEXT, file=TEXT, runnerFile=TEXT, runner=LIST,
                  scheduling=OBJECT),
    "stop": _INSTANCE,
    "pause": _INSTANCE,
    "resume": _INSTANCE,
    "logs": _INSTANCE,
    "checkpoints": {},
}


def is_kind(value, kind):
    if kind == TEXT:
        return isinstance(value, str)
    if kind == WHOLE:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, dict if kind == OBJECT else list)


def request_problem(command, request):
    """Why `request` cannot be carried out as `command` (a sentence), or None when its shape is
    right. Only the shape: what the values mean (a lease's not-after, a strategy's name) is checked
    where they are used, and answered there."""
    if not isinstance(request, dict):
        return "the request is %s, not a JSON object" % _json_kind(request)
    for name, kind in sorted(REQUEST_FIELDS.get(command, {}).items()):
        if name not in request:
            return "the request has no %r" % name
        if not is_kind(request[name], kind):
            return "%r is %s, not %s" % (name, _json_kind(request[name]), kind)
    if command in ("stop", "pause", "resume") and request.get("epoch") is not None \
            and not is_kind(request["epoch"], WHOLE):
        return "'epoch' is %s, not a whole number or null" % _json_kind(request["epoch"])
    if command == "start":
        if not request["runner"] or not all(isinstance(part, str) for part in request["runner"]):
            return "'runner' is not a list of text"
        if not is_kind(request["scheduling"].get("stopTimeoutSeconds"), NUMBER):
            return "'scheduling' has no number 'stopTimeoutSeconds'"
    if command == "probe":
        if not is_kind(request.get("workers", []), LIST):
            return "'workers' is %s, not a list" % _json_kind(request["workers"])
        for i, worker in enumerate(request.get("workers", [])):
            if not (isinstance(worker, dict) and isinstance(worker.get("id"), str)
                    and isinstance(worker.get("workdir"), str)):
                return "workers[%d] is not an object with text 'id' and 'workdir'" % i
    if command == "checkpoints":
        workers = request.get("workers") or {}
        if not isinstance(workers, dict) or not all(
                isinstance(asked, dict) and isinstance(asked.get("workdir"), str)
                and isinstance(asked.get("instances") or {}, dict) for asked in workers.values()):
            return "'workers' is not an object of workers, each with a text 'workdir' and an object 'instances'"
    return None


def answer_problem(command, answer):
    """Why an `answer` (a JSON object) to `command` cannot be acted on (a sentence), or None. A result
    outside the command's closed set says nothing of what happened on the host: the caller must
    assume the worst (a stop that may not have stopped, a start that may have started)."""
    known = RESULTS.get(command)
    if known is None:
        return None
    result = answer.get("result")
    if not isinstance(result, str) or result not in known:
        return "an unknown result %s (one of %s was expected)" % (_shown(result), ", ".join(known))
    return None


def _json_kind(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return {str: "text", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(value), "?")


def _shown(value):
    text = "%r" % (value,)
    return text if len(text) <= 60 else text[:57] + "..."


def instance_key(lease_key, strategy, epoch):
    """The key of one copy (hex): derived from the controller's lease key (bytes), so that the
    controller needs to keep one secret, and a copy's key is worth nothing to any other copy."""
    return hmac.new(lease_key, ("instance\0%s\0%d" % (strategy, epoch)).encode("utf-8"), hashlib.sha256).hexdigest()


def lease_proof(key_hex, epoch, not_after):
    """The proof that a renewal of `epoch` up to `not_after` ({"bootId", "boottime"}) came from the
    controller that holds the copy's key. The not-after's time is written as repr() of the float both
    sides read from JSON, so both sides hash the same bytes."""
    message = "renew\0%d\0%s\0%r" % (epoch, not_after.get("bootId"), float(not_after.get("boottime")))
    return hmac.new(bytes.fromhex(key_hex), message.encode("utf-8"), hashlib.sha256).hexdigest()


def proof_matches(key_hex, epoch, not_after, proof):
    """Whether `proof` proves a renewal of `epoch` up to `not_after` with this key (constant time);
    False for anything malformed."""
    try:
        return isinstance(proof, str) and hmac.compare_digest(lease_proof(key_hex, epoch, not_after), proof)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return False
