"""The entry point: `python3 agent.pyz COMMAND` with the request as JSON on stdin, or `serve`, which
answers many such calls over one channel (serve.py)."""
import importlib
import json
import os
import sys

from .protocol import EXIT_BAD_REQUEST, FENCED_COMMANDS, request_problem

# --- entry point ------------------------------------------------------------------------------------

# Each command imports only the module it needs, when it runs: a probe (every host, every round)
# then never loads the supervisor, the log reader or the start and stop code.

def _lazy(module, function, *fixed):
    """The command that calls `module.function(request, args)` (or with `fixed` instead of args)."""
    def run(request, args):
        call = getattr(importlib.import_module("." + module, __package__), function)
        return call(request, *fixed) if fixed else call(request, args)
    run.module = module
    return run


def preload(command):
    """Import what `command` needs ahead of its calls (`serve` does, once for all its children)."""
    importlib.import_module("." + COMMANDS[command].module, __package__)


COMMANDS = {
    "probe": _lazy("probe", "probe"),
    "start": _lazy("control", "start"),
    "stop": _lazy("control", "stop"),
    "pause": _lazy("control", "set_paused", True),
    "resume": _lazy("control", "set_paused", False),
    "logs": _lazy("logs", "logs"),
    "checkpoints": _lazy("probe", "copy_checkpoints"),
}


def main(argv):
    if len(argv) < 2:
        sys.stderr.write("usage: agent.pyz probe|start|stop|pause|resume|logs|checkpoints|serve|supervise ...\n")
        return EXIT_BAD_REQUEST
    command, args = argv[1], argv[2:]
    if command == "supervise":
        from .supervisor import supervise
        return supervise(args)
    if command == "serve":
        from .serve import serve
        return serve(args)
    if command not in COMMANDS:
        sys.stderr.write("unknown command %r\n" % command)
        return EXIT_BAD_REQUEST
    if args and (args[0] != "--request" or len(args) != 2):
        # Everything else travels in the request (a renewal needs its notAfter, say).
        sys.stderr.write("unexpected arguments %s: the only option is --request FILE\n" % " ".join(args))
        return EXIT_BAD_REQUEST
    try:
        if args:                       # the request from a file instead of stdin (by hand, other tools)
            with open(args[1], "rb") as handle:
                request = json.loads(handle.read())
        else:
            request = json.loads(sys.stdin.buffer.read() or b"{}")
    except OSError as exc:
        sys.stderr.write("cannot read the request: %s\n" % exc)
        return EXIT_BAD_REQUEST
    except ValueError as exc:
        sys.stderr.write("request is not JSON: %s\n" % exc)
        return EXIT_BAD_REQUEST
    if isinstance(request, dict) and "leaseKey" in request:
        from .procs import keep_secrets
        keep_secrets()                 # a copy's lease key is in this process's memory now
    problem = request_problem(command, request)
    if problem is not None:
        sys.stderr.write("bad %s request: %s; nothing was done\n" % (command, problem))
        return EXIT_BAD_REQUEST
    if command in FENCED_COMMANDS:
        from .fence import admit
        workdir = os.path.abspath(os.path.expanduser(request["workdir"]))
        refused, highest = admit(workdir, request)
        if refused is not None:
            sys.stdout.write(json.dumps({"result": "fenced", "reason": refused, "fence": highest}))
            return 0
    try:
        result = COMMANDS[command](request, args)
    except Exception as exc:           # noqa: BLE001 - said in one line; what it did is unknown
        sys.stderr.write("agent %s failed: %s: %s\n" % (command, type(exc).__name__, exc))
        return 1
    answer, code = result if isinstance(result, tuple) else (result, 0)
    if answer is not None:
        sys.stdout.write(json.dumps(answer))
        sys.stdout.flush()
    return code
