"""Category 2, git content: the world's fleet directory is a git repository, and `reconcile --once`
applies the newest commit of its branch, read through git (docs/git.md). Each case commits something
hostile — a symlink out of the repository, YAML that does not parse (fixed on disk, not committed),
a file over the size cap, a submodule entry where a file was, a symlink loop — or breaks the
repository itself. The loop names the file (and line) and what to do, exits 1, starts and stops
nothing; it renews leases by design, so the state keeps what runs where (kit.play)."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.corpus.kit import WORKERS_YAML, Link, Sparse, World, cases_of, params, play

case = cases_of("git")
RECONCILE = ["reconcile", "--once"]
INVALID = "at the commits of refs/heads/main does not validate; nothing is started or stopped"

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "ops", "GIT_AUTHOR_EMAIL": "ops@example.invalid",
           "GIT_COMMITTER_NAME": "ops", "GIT_COMMITTER_EMAIL": "ops@example.invalid",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}


def git(world: World, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=world.fleet, env=GIT_ENV, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def commit(world: World) -> None:
    git(world, "add", "-A")
    git(world, "commit", "-q", "-m", "a change")


def start_repository(world: World) -> None:
    git(world, "init", "-q", "-b", "main")
    commit(world)


WORLD_THEN = start_repository


def committed_then_fixed_on_disk(world: World) -> None:
    commit(world)
    (world.fleet / "workers.yaml").write_text(WORKERS_YAML)


def submodule_where_a_file_was(world: World) -> None:
    git(world, "rm", "-q", "--cached", "strategies/s1.mjs")
    git(world, "update-index", "--add", "--cacheinfo", "160000," + "1" * 40 + ",strategies/s1.mjs")
    git(world, "commit", "-q", "-m", "s1.mjs as a submodule")


def object_lost(world: World) -> None:
    blob = git(world, "rev-parse", "HEAD:workers.yaml")
    (world.fleet / ".git" / "objects" / blob[:2] / blob[2:]).unlink()


def rebase_in_progress(world: World) -> None:
    (world.fleet / ".git" / "rebase-merge").mkdir()


def failing_smudge_filter(world: World) -> None:
    commit(world)
    git(world, "config", "filter.vault.smudge", "false")
    git(world, "config", "filter.vault.required", "true")


def head_names_no_commit(world: World) -> None:
    (world.fleet / ".git" / "refs" / "heads" / "main").write_text("0" * 40 + "\n")


CASES = [
    case("symlink-out-of-the-repository", RECONCILE, 1,
         (INVALID, "{fleet}/strategies.yaml:4: Strategy s1: strategyFile 'strategies/s1.mjs' resolves outside the "
                   "fleet directory (/etc/passwd); keep strategy files inside it"),
         setup={"fleet/strategies/s1.mjs": Link("/etc/passwd")}, then=commit, keeps="placements"),
    case("symlink-up-out-of-the-fleet", RECONCILE, 1,
         (INVALID, "{fleet}/strategies.yaml:4: Strategy s1: strategyFile 'strategies/s1.mjs' resolves outside"),
         setup={"fleet/strategies/s1.mjs": Link("../../outside.mjs"), "outside.mjs": "//\n"}, then=commit,
         keeps="placements"),
    case("invalid-yaml-committed", RECONCILE, 1,
         ("uncommitted changes the loop does not apply", "fleet/workers.yaml",
          "{fleet}/workers.yaml:18: YAML syntax error: while parsing a flow sequence"),
         setup={"fleet/workers.yaml": WORKERS_YAML + "---\napiVersion: quantlab/v1\nkind: Worker\nid: [w3\n"},
         then=committed_then_fixed_on_disk, keeps="placements"),
    case("duplicate-ids-committed", RECONCILE, 1,
         "{fleet}/workers.yaml:3: duplicate Worker id 'w1': also defined at {fleet}/more.yaml:3",
         setup={"fleet/more.yaml": WORKERS_YAML.split("---")[0]}, then=commit, keeps="placements"),
    case("huge-strategy-file-committed", RECONCILE, 1,
         "{fleet}/strategies.yaml:4: Strategy s1: strategyFile 'strategies/s1.mjs' is larger than 16 MiB",
         setup={"fleet/strategies/s1.mjs": b"//" + b"x" * (17 * 2**20)}, then=commit, keeps="placements"),
    case("sparse-yaml-committed", RECONCILE, 1, "{fleet}/big.yaml: larger than 16 MiB; split it into smaller files",
         setup={"fleet/big.yaml": Sparse(17 * 2**20)}, then=commit, keeps="placements"),
    case("submodule-where-a-file-was", RECONCILE, 1,
         "{fleet}/strategies/s1.mjs: submodule at commit 111111111111 is not available",
         then=submodule_where_a_file_was, keeps="placements"),
    case("object-missing", RECONCILE, 1,
         ("{fleet}/workers.yaml: its object", "is missing from the repository (a shallow or partial clone?)"),
         then=object_lost, keeps="placements"),
    case("yaml-symlink-to-a-directory", RECONCILE, 1, "{fleet}/workers.yaml: is a directory, not a YAML file",
         setup={"fleet/workers.yaml": Link("strategies"), "fleet/w.yaml": WORKERS_YAML}, then=commit,
         keeps="placements"),
    case("yaml-symlink-loop", RECONCILE, 1, "{fleet}/a.yaml: cannot read: symlink loop; fix or remove it",
         setup={"fleet/a.yaml": Link("b.yaml"), "fleet/b.yaml": Link("a.yaml")}, then=commit, keeps="placements"),
    case("smudge-filter-fails", RECONCILE, 1, ("{fleet}: git could not check out commit", "smudge filter vault failed"),
         setup={"fleet/.gitattributes": "*.yaml filter=vault\n"}, then=failing_smudge_filter, keeps="placements"),
    case("rebase-in-progress", RECONCILE, 1,
         "a rebase is in progress in {fleet}; the loop renews leases and applies nothing until it is finished or aborted",
         then=rebase_in_progress, keeps="placements"),
    case("branch-names-no-commit", RECONCILE, 1,
         ("cannot read the commits of refs/heads/main: `git status` failed: fatal: bad object HEAD",
          "nothing is started or stopped"),
         then=head_names_no_commit, keeps="placements"),
]


@pytest.mark.parametrize("case", params(CASES))
def test_git_content(case, world, tmp_path, request):
    play(case, world, tmp_path, request)
