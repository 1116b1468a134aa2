"""quantlab host agent: shipped to every worker host, standard library only, Python 3.8+.

It imports nothing of the controller. The controller runs it with one subcommand per call, a JSON
request on stdin and a JSON answer on stdout:

  probe                 first renews the leases the request names (`renew`: epoch must match), then
                        describes every instance of every worker workdir named in the request, the
                        host's load, runtimes and clocks. Each worker's entry lists `renewed` (ids) and
                        `refused` ({id: why}) for the renewals it was asked for.
  start                 start (or replace) one strategy under its own supervisor process
  stop | pause | resume one strategy
  logs                  tail of a strategy's output (the request's `follow` keeps streaming)
  supervise DIR         (internal) the supervisor of one instance; started by `start`

`--request FILE` reads the request from a file instead of stdin (by hand, other tools).

Renewals and starts carry a not-after instant on this host's boot-time clock (`notAfter`: bootId and
boottime, from the clock this host reported in an earlier answer). A request that arrives after it,
or on another boot, grants nothing, and no lease ever reaches past not-after + leaseTtlSeconds: the
controller has counted the lease as lapsed from then on, whether or not its call returned. A lease
that has run out stays out: the agent never renews it, and neither the supervisor nor the runner takes
a later deadline once the one they know has passed (the strategy is fenced; a new start is needed).

start, stop, pause and resume of one instance are serialised by a lock on `<instance>/.lock`. A file
in the instance folder can be held by the strategy too, so it is never waited for without a deadline:
when it cannot be had within 10 s (or the request's `lockTimeoutSeconds`; a start never waits past its
not-after) the answer is {"result": "busy", "reason": ...} and nothing was done. Renewals take no lock.
Once `start` has spawned the supervisor it always answers {"result": "started", "pid": N}; bookkeeping
that failed after that (stop likewise) is listed in the answer's `problems`, and the supervisor
rewrites supervisor.pid itself at once.

Layout of a workdir:
  agent/                 this file and the reference runner, by content hash
  files/<sha256>.<ext>   strategy files, content-addressed
  secrets/<account>.env  KEY=VALUE lines added to the runner's environment
  instances/<id>/        spec.json status.json lease.json heartbeat.json output.log events.log state/

state/ is the strategy's checkpoint folder: the controller copies it (`checkpoints`, each round,
only when it differs from the controller's copy; `stop`, the final one) and puts it back on the
worker a strategy moves to (`start`).

The runner, and everything a strategy does, runs as this agent's user with the instance folder as
its working directory, so every file in that folder is hostile input here: it is opened without
following links or blocking, read only when it is a regular file under a size cap, and every field
is type-checked. A bad file is its instance's problem (reported as `problems`), never the host's.

Containment: `supervise` forks. The parent (the keeper, whose pid is in supervisor.pid) forwards
signals to the child (the supervisor proper) and, should the supervisor be killed outright, stops
what it left. Both are child subreapers (Linux), so every process a strategy starts, also a
`setsid` or double-forked one, stays below them and is killed before a restart and at the end.
"""
