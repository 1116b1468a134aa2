"""The Scheduler: feasibility filters with reasons, worker classes, and the SchedulePolicy family."""
from .filters import Rejection, summarize
from .policies import FailoverPolicy, LoadBasedPolicy, RegionAffinityPolicy, RoundRobinPolicy, SchedulePolicy, fleet_policy
from .pool import WorkerClass, WorkerPool, WorkerView
from .scheduler import Decision, Scheduler

__all__ = [
    "Decision", "FailoverPolicy", "LoadBasedPolicy", "RegionAffinityPolicy", "Rejection", "RoundRobinPolicy",
    "SchedulePolicy", "Scheduler", "WorkerClass", "WorkerPool", "WorkerView", "fleet_policy", "summarize",
]
