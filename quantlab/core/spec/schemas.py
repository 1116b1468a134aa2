"""The JSON Schemas in `schemas/`: the only place validation rules live.

Besides validation, the schemas give the defaults (applied here) and the set of known kinds.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMA_FILES = ("strategy.schema.json", "worker.schema.json", "fleet.schema.json")


def schema_folder() -> Any:
    # A source checkout (and an editable install) reads the top-level schemas/ folder; a wheel
    # carries the same files as the package data `quantlab.schemas`.
    checkout = Path(__file__).resolve().parents[3] / "schemas"
    return checkout if checkout.is_dir() else resources.files("quantlab.schemas")


@lru_cache(maxsize=None)
def schemas_by_kind() -> dict[str, dict[str, Any]]:
    """{"Strategy": schema, ...}, keyed by each schema's `kind` constant."""
    folder = schema_folder()
    out: dict[str, dict[str, Any]] = {}
    for name in SCHEMA_FILES:
        schema = json.loads(folder.joinpath(name).read_text(encoding="utf-8"))
        out[schema["properties"]["kind"]["const"]] = schema
    return out


@lru_cache(maxsize=None)
def validator_for(kind: str) -> Draft202012Validator:
    schema = schemas_by_kind()[kind]
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def api_version() -> str:
    # Every kind shares one apiVersion; read it from any schema so it is written once.
    return str(next(iter(schemas_by_kind().values()))["properties"]["apiVersion"]["const"])


def apply_defaults(instance: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `instance` with every schema `default` filled in where a field is missing, recursively.
    Also safe on an instance with schema errors: a field of the wrong type is kept as it is."""
    out = dict(instance)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if isinstance(out.get(key), dict) and "properties" in sub:
            out[key] = apply_defaults(out[key], sub)
    return out


def schema_at(schema: dict[str, Any], path: list[Any]) -> dict[str, Any]:
    """The sub-schema that describes the field at `path` (empty dict when unknown)."""
    node = schema
    for part in path:
        props = node.get("properties", {})
        if isinstance(part, str) and part in props:
            node = props[part]
        elif isinstance(part, int) and "items" in node:
            node = node["items"]
        else:
            return {}
    return node
