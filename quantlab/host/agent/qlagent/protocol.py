"""The controller–agent protocol, written down once. Standard library only: the agent imports it,
and so does the controller (quantlab.host.agent.qlagent.protocol), which imports nothing else of
the agent.

A call is `python3 -I -S agent.pyz COMMAND` with one JSON request on stdin and one JSON answer on
stdout (exit 0), or EXIT_MISSING (the files the request names must be uploaded first), or
EXIT_BAD_REQUEST. The shapes, by command:

probe        {"workers": [{"id", "workdir", "program"}], "eventsSince": {worker: ms},
              "renew": {worker: {strategy: epoch}}, "leaseTtlSeconds", "notAfter": {"bootId", "boottime"}}
          -> {"host": {"cpus", "time", "boottime", "bootId", "loadavg", "memFreeMb", "answeredAt",
                       "renewRefused"?}, "workers": {worker: {"instances": {strategy: INSTANCE},
                       "renewed": [strategy], "refused": {strategy: why}, ...}}}
              INSTANCE: {"strategy", "epoch", "specHash", "status" (INSTANCE_STATUSES), "alive",
                         "reason", "restarts", "events", "problems", "launched", ...}
start        {"worker", "workdir", "strategy", "epoch", "specHash", "file", "runnerFile", "runner",
              "params", "heartbeatMs", "scheduling", "region", "proxy", "account", "leaseTtlSeconds",
              "paused", "notAfter", "checkpoint"?}          -> {"result": START_RESULTS, ...}
stop         {"workdir", "strategy", "epoch", "stopTimeoutSeconds", "reason", "checkpoint", "keep"}
                                                           -> {"result": STOP_RESULTS, "checkpoint"?, ...}
pause/resume {"workdir", "strategy", "epoch"}              -> {"result": ...}
logs         {"workdir", "strategy", "lines", "follow", "since"?, "grep"?, "cpuSeconds"?}
                                                           -> the output's bytes (not JSON)
checkpoints  {"workers": {worker: {"workdir", "instances": {strategy: {"epoch", "have"}}}}}
          -> {"workers": {worker: {strategy: {"result": CHECKPOINT_RESULTS, "checkpoint"?, ...}}}}
supervise    INSTANCE_DIR (started by `start`, never by the controller)

probe, start, stop, pause and resume may carry "fence": {"lineage", "term"}, the sending controller's
leadership term of its state (see fence.py): a term below the highest the workdir has seen for that
lineage is refused — start/stop/pause/resume answer {"result": "fenced", "reason", "fence": highest},
a probe refuses that worker's renewals and says "fenced" — and every probe worker reports
"fence": the highest term seen there (a null term asks without raising it).
"""

EXIT_MISSING = 3        # files the request names are not on the host: upload them, then retry
EXIT_BAD_REQUEST = 4

COMMANDS = ("probe", "start", "stop", "pause", "resume", "logs", "checkpoints", "supervise")

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
