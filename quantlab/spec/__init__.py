"""The desired state: fleet YAML loaded, validated against `schemas/`, and turned into frozen models."""
from .loader import FleetInvalid, Problem, load_fleet
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

__all__ = [
    "LOCAL_HOST", "Fleet", "FleetInvalid", "FleetSettings", "Location", "MonitorSettings",
    "NotifySettings", "Problem", "Requirements", "SchedulingSpec", "SshSettings", "StrategySpec",
    "WorkerSpec", "canonical_json", "load_fleet", "worker_launch",
]
