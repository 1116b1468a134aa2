"""Reading a fleet from a commit through git itself (quantlab.edges.follow.Follower on real repositories).

Every file comes from the commit as `git checkout` would write it — line-ending filters, symlinks,
submodules at their recorded commits — and never from the working tree; what git cannot give (an
LFS pointer, a missing object, a submodule not cloned) is a validation problem naming the file.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from quantlab.edges.follow import Follower
from quantlab.edges.fleetfiles import load_fleet
from quantlab.core.spec import FleetInvalid

from test_gitops import git, commit

FLEET = """apiVersion: quantlab/v1
kind: Worker
id: w1
host: local
capabilities: {maxStrategies: 4, supportedApis: [paper]}
---
apiVersion: quantlab/v1
kind: Strategy
id: s1
strategyFile: strategies/s1.mjs
requirements: {api: paper}
"""
JS = "export async function st_heartbeat(ctx) {\n  ctx.log('beat');\n}\n"


def repo_with_fleet(root: Path, files: dict[str, str] | None = None) -> Path:
    git(root.parent, "init", "-q", "-b", "main", str(root))
    fleet = root / "fleet"
    (fleet / "strategies").mkdir(parents=True)
    (fleet / "fleet.yaml").write_text(FLEET)
    (fleet / "strategies" / "s1.mjs").write_text(JS)
    for rel, text in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    commit(root, "fleet")
    return fleet


def follow(fleet: Path, tmp_path: Path):
    return Follower(fleet, tmp_path / "state").load()


def problems(fleet: Path, tmp_path: Path) -> list[str]:
    with pytest.raises(FleetInvalid) as caught:
        follow(fleet, tmp_path)
    return [str(p) for p in caught.value.problems]


def test_the_commit_is_read_not_the_working_tree(tmp_path):
    fleet = repo_with_fleet(tmp_path / "repo")
    committed = follow(fleet, tmp_path)
    (fleet / "strategies" / "s1.mjs").write_text(JS + "// not committed\n")
    (fleet / "more.yaml").write_text("this: is not even a fleet document\n")
    again = Follower(fleet, tmp_path / "state").load()
    assert again.strategies["s1"].spec_hash == committed.strategies["s1"].spec_hash
    assert again.fleet_hash == committed.fleet_hash and again.revision == committed.revision
    assert again.uncommitted is False and again.source == "commit of refs/heads/main"
    with pytest.raises(FleetInvalid):
        load_fleet(fleet)                        # the working tree would not even validate


def test_line_ending_filters_give_the_bytes_and_spec_hash_of_a_checkout(tmp_path):
    fleet = repo_with_fleet(tmp_path / "repo", {".gitattributes": "*.mjs text eol=crlf\n"})
    from_git = follow(fleet, tmp_path)
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", str(tmp_path / "repo"), str(checkout))
    assert b"\r\n" in (checkout / "fleet" / "strategies" / "s1.mjs").read_bytes()
    from_disk = load_fleet(checkout / "fleet")
    assert from_git.strategies["s1"].file_sha256 == from_disk.strategies["s1"].file_sha256
    assert from_git.strategies["s1"].spec_hash == from_disk.strategies["s1"].spec_hash
    assert from_git.strategies["s1"].strategy_path.read_bytes() == (checkout / "fleet/strategies/s1.mjs").read_bytes()


def test_an_uncommitted_gitattributes_changes_nothing(tmp_path):
    fleet = repo_with_fleet(tmp_path / "repo")
    committed = follow(fleet, tmp_path)
    (fleet.parent / ".gitattributes").write_text("*.mjs text eol=crlf\n")     # untracked
    again = Follower(fleet, tmp_path / "state2").load()
    assert again.strategies["s1"].strategy_path.read_bytes() == JS.encode()
    assert again.strategies["s1"].spec_hash == committed.strategies["s1"].spec_hash


def test_a_repository_git_cannot_read_is_an_error_not_the_files_on_disk(tmp_path):
    from quantlab.edges.gitsource import GitError

    fleet = repo_with_fleet(tmp_path / "repo")
    with open(fleet.parent / ".git" / "config", "a") as config:
        config.write("[core\n")                          # a broken line
    with pytest.raises(GitError, match="git cannot read the repository"):
        Follower(fleet, tmp_path / "state")


def test_symlinks_resolve_inside_the_commit(tmp_path):
    fleet = repo_with_fleet(tmp_path / "repo")
    (fleet / "strategies" / "current.mjs").symlink_to("s1.mjs")
    (fleet / "fleet.yaml").write_text(FLEET.replace("strategies/s1.mjs", "strategies/current.mjs"))
    commit(fleet.parent, "via a symlink")
    (fleet / "strategies" / "s1.mjs").write_text("// an uncommitted edit behind the symlink\n")
    loaded = follow(fleet, tmp_path)
    assert loaded.strategies["s1"].strategy_path.read_text() == JS

    outside = tmp_path / "outside.mjs"
    outside.write_text(JS)
    (fleet / "strategies" / "current.mjs").unlink()
    (fleet / "strategies" / "current.mjs").symlink_to(outside)
    commit(fleet.parent, "points outside")
    found = problems(fleet, tmp_path)
    assert any("outside the fleet directory" in p and "fleet.yaml" in p for p in found), found


def test_a_submodule_is_read_at_its_recorded_commit(tmp_path):
    lib = tmp_path / "lib"
    git(tmp_path, "init", "-q", "-b", "main", str(lib))
    (lib / "s1.mjs").write_text(JS)
    recorded = commit(lib, "v1")
    fleet = repo_with_fleet(tmp_path / "repo")
    git(fleet.parent, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "fleet/lib")
    (fleet / "fleet.yaml").write_text(FLEET.replace("strategies/s1.mjs", "lib/s1.mjs"))
    commit(fleet.parent, "strategy from a submodule")
    # The submodule's clone moves on (and has an uncommitted edit): the recorded commit is what counts.
    (fleet / "lib" / "s1.mjs").write_text("// v2\n")
    commit(fleet / "lib", "v2")
    (fleet / "lib" / "s1.mjs").write_text("// v3, uncommitted\n")
    loaded = follow(fleet, tmp_path)
    assert loaded.strategies["s1"].strategy_path.read_text() == JS, f"read other than {recorded}"

    saved = tmp_path / "lib-clone"
    shutil.move(fleet / "lib", saved)
    (fleet / "lib").mkdir()                     # as a clone without `git submodule update --init`
    follower = Follower(fleet, tmp_path / "state")
    with pytest.raises(FleetInvalid) as caught:
        follower.load()
    found = [str(p) for p in caught.value.problems]
    assert any("lib" in p and "git submodule update --init" in p for p in found), found
    # Fixed without a new commit: the same follower reads it on its next round.
    (fleet / "lib").rmdir()
    shutil.move(saved, fleet / "lib")
    assert follower.load().strategies["s1"].strategy_path.read_text() == JS


def test_an_lfs_pointer_is_a_problem_naming_the_file(tmp_path):
    pointer = ("version https://git-lfs.github.com/spec/v1\noid sha256:"
               "4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")
    fleet = repo_with_fleet(tmp_path / "repo")
    (fleet / "strategies" / "s1.mjs").write_text(pointer)
    commit(fleet.parent, "s1 stored with LFS, not fetched")
    found = problems(fleet, tmp_path)
    assert any("strategyFile" in p and "Git LFS pointer" in p for p in found), found


def test_a_missing_object_is_a_problem_naming_the_file(tmp_path):
    fleet = repo_with_fleet(tmp_path / "repo")
    blob = git(fleet.parent, "rev-parse", "HEAD:fleet/strategies/s1.mjs")
    (fleet.parent / ".git" / "objects" / blob[:2] / blob[2:]).unlink()
    found = problems(fleet, tmp_path)
    assert any("s1.mjs" in p and "missing from the repository" in p for p in found), found
    assert not any(Path(p.split(":")[0]).exists() and "/state/" in p for p in found), "messages name the fleet dir"


def test_outside_git_the_files_on_disk_are_read(tmp_path):
    fleet = tmp_path / "plain"
    (fleet / "strategies").mkdir(parents=True)
    (fleet / "fleet.yaml").write_text(FLEET)
    (fleet / "strategies" / "s1.mjs").write_text(JS)
    follower = Follower(fleet, tmp_path / "state")
    assert follower.source.kind == "directory" and not follower.follows_commits
    assert follower.load().revision is None
    assert subprocess.run(["git", "-C", str(fleet), "rev-parse"], capture_output=True).returncode != 0


def test_a_detached_head_follows_the_commit_checked_out(tmp_path):
    fleet = repo_with_fleet(tmp_path / "repo")
    first = git(fleet.parent, "rev-parse", "--short=12", "HEAD")
    (fleet / "strategies" / "s1.mjs").write_text(JS + "// v2\n")
    second = commit(fleet.parent, "v2")
    git(fleet.parent, "checkout", "-q", "--detach", first)
    follower = Follower(fleet, tmp_path / "state")
    assert follower.source.ref == "HEAD" and follower.load().revision == first
    git(fleet.parent, "checkout", "-q", "--detach", second)     # a deploy checks out the next commit
    assert follower.load().revision == second


def test_a_repository_git_refuses_is_an_error_not_the_files_on_disk(tmp_path, monkeypatch):
    import os

    from quantlab.edges.gitsource import GitError

    if os.geteuid() != 0:
        pytest.skip("needs root to give the repository to another user")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")      # no safe.directory of this machine's
    fleet = repo_with_fleet(tmp_path / "repo")
    subprocess.run(["chown", "-R", "65534:65534", str(fleet.parent)], check=True)
    with pytest.raises(GitError, match="owned by another user"):
        Follower(fleet, tmp_path / "state")
    assert Follower(fleet, tmp_path / "state", working_tree=True).source.kind == "working-tree"


def test_a_hanging_smudge_filter_ends_with_the_git_call_that_ran_it(tmp_path, monkeypatch):
    """A filter that never finishes makes reading the commit fail within the deadline, and nothing
    it started is left running (it would hold the checkout for ever, one more per round)."""
    import quantlab.edges.gitsource
    from quantlab.edges.gitsource import GitError
    from tests.support import processes, wait_for

    hang = tmp_path / "hang-filter.sh"
    hang.write_text("#!/bin/sh\nsleep 600\n")           # this shell, with its path in its command line, waits
    hang.chmod(0o755)
    fleet = repo_with_fleet(tmp_path / "repo", {".gitattributes": "*.yaml filter=hang\n"})
    git(tmp_path / "repo", "config", "filter.hang.smudge", str(hang))
    monkeypatch.setattr(quantlab.edges.gitsource, "GIT_DEADLINE_S", 1.0)
    with pytest.raises(GitError, match="did not finish within 1 s"):
        follow(fleet, tmp_path)
    wait_for(lambda: not processes(str(hang)), 5, what="the filter to be gone with git")
