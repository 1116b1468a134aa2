"""The desired state: fleet YAML validated against `schemas/` and turned into frozen models. Pure:
quantlab/edges/fleetfiles.py reads the files (`load_fleet`)."""
from .models import (
    LOCAL_HOST,
    Fleet,
    FleetSettings,
    Location,
    MonitorSettings,
    NotifySettings,
    Requirements,
    SchedulingSpec,
    SshSettings,
    StrategySpec,
    WorkerSpec,
    canonical_json,
    worker_launch,
)
from .problems import FleetInvalid, Problem

__all__ = [
    "LOCAL_HOST", "Fleet", "FleetInvalid", "FleetSettings", "Location", "MonitorSettings",
    "NotifySettings", "Problem", "Requirements", "SchedulingSpec", "SshSettings", "StrategySpec",
    "WorkerSpec", "canonical_json", "worker_launch",
]
