"""Validate a fleet's files into a `Fleet`, or report every problem at once. Pure: the bytes come
from an adapter (quantlab/edges/fleetfiles.py reads the fleet directory or a checkout of a commit).

Two steps, because which strategy files matter is known only from the YAML: `parse_fleet` parses
and checks the YAML files, the adapter reads the strategy files they name, and `build_fleet` checks
the cross-references and builds the models. A document with schema errors still takes part in the
cross-references, from its fields that passed, so that one run reports every problem; models are
built only when there is none.

The parts, in the order a file goes through them:

    inputs.py      what the adapter hands in (FleetFile, StrategyFile) and the file limits it applies
    yamldocs.py    YAML documents read, measured before their aliases expand, and their line numbers
    documents.py   one document against its schema: the errors worded, the Document it becomes
    parsing.py     step one: ParsedFleet, the fleet's documents and every problem found so far
    kinds.py       step two per document: FleetSettings, WorkerSpec, StrategySpec (ModelBuilder)
    crossrefs.py   step two across documents: unique ids, workdirs, shared accounts
    problems.py    Problem, FleetInvalid, and the wording every message shares
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from . import crossrefs
from .inputs import FleetFile, StrategyFile
from .kinds import ModelBuilder
from .models import Fleet
from .parsing import ParsedFleet
from .problems import FleetInvalid, Problem


def parse_fleet(root: Path, files: list[FleetFile], problems: list[Problem]) -> ParsedFleet:
    """The YAML files of the fleet directory at `root` (as shown in messages) parsed and checked;
    `problems`: what the adapter could not read (folders, a checkout), reported with the rest."""
    parsed = ParsedFleet(root)
    for problem in problems:
        parsed.problem((problem.file, problem.line), problem.message)
    for found in files:
        parsed.add_file(found)
    return parsed


def build_fleet(parsed: ParsedFleet, strategy_files: Mapping[str, StrategyFile]) -> Fleet:
    """The validated Fleet, or FleetInvalid with every problem. `strategy_files`: what the adapter
    found for each of `parsed.strategy_files()`."""
    builder = ModelBuilder(parsed, strategy_files)
    by_kind = parsed.by_kind()
    fleet_docs = by_kind["Fleet"]
    for extra in fleet_docs[1:]:
        parsed.problem(extra.loc("kind"), f"more than one Fleet document: the first is at {fleet_docs[0].loc('kind')}")
    settings = builder.settings(fleet_docs[0] if fleet_docs else None)
    if fleet_docs:
        builder.lease_rule(fleet_docs[0], settings)

    worker_docs = crossrefs.unique(parsed, by_kind["Worker"], "Worker")
    crossrefs.workdirs(parsed, worker_docs)
    workers = [(d, builder.worker(d)) for d in worker_docs if d.valid]
    first_of_id = {id(d) for d in crossrefs.unique(parsed, by_kind["Strategy"], "Strategy")}
    strategies = []
    for doc in by_kind["Strategy"]:
        # Every Strategy's file and params are checked, a repeated id's too; specs only of the first.
        spec = builder.strategy(doc)
        if spec is not None and id(doc) in first_of_id:
            strategies.append((doc, spec))
    crossrefs.shared_accounts(parsed, [d for d in by_kind["Strategy"] if id(d) in first_of_id])

    root = parsed.root
    if not parsed.files and not parsed.problems:
        parsed.problem((str(root), 0), "no *.yaml or *.yml files found; run `quantlab init` to start one")
    if parsed.problems:
        raise FleetInvalid(parsed.problems)

    digest = hashlib.sha256()
    for rel in sorted(parsed.digests):
        digest.update(f"{rel}\0{parsed.digests[rel]}\n".encode())
    return Fleet(
        root=root,
        settings=settings,
        strategies=MappingProxyType({s.id: s for _, s in sorted(strategies, key=lambda p: p[1].id)}),
        workers=MappingProxyType({w.id: w for _, w in sorted(workers, key=lambda p: p[1].id)}),
        fleet_hash="sha256:" + digest.hexdigest(),
        files=tuple(parsed.files),
    )
