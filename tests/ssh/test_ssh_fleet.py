"""A fleet on real sshd hosts: apply places and starts runners on the right hosts, status reports
them, a second plan has nothing to do; a worker behind a ProxyJump host; params full of shell
metacharacters reach the runner verbatim."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sshfleet import wait_for

pytestmark = pytest.mark.ssh


def ssh_config_with_jump(fl, alias: str, target, jump: str):
    """The cluster's ssh_config plus `alias` for `target`'s sshd, reached through `jump`."""
    c = fl.cluster
    config = fl.root / f"ssh_config_{alias}"
    config.write_text(c.ssh_config_path.read_text() + "\n" + "\n".join([
        f"Host {alias}",
        f"    HostName {target.address}",
        f"    Port {target.port}",
        f"    User {c.user}",
        f"    IdentityFile {c.client_key_path}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {c.known_hosts_path}",
        f"    ProxyJump {jump}",
    ]) + "\n")
    return config


@pytest.mark.slow
def test_apply_spreads_a_fleet_over_three_hosts(ssh_fleet):
    fl = ssh_fleet(3)
    fl.worker("jp-1", "host-01", region="JP").worker("jp-2", "host-02", region="JP")
    fl.worker("us-1", "host-03", region="US")
    for sid in ("grid-jp-a", "grid-jp-b", "grid-jp-c"):
        fl.strategy(sid, region="JP")
    fl.strategy("trend-us", region="US")
    fl.write()

    placed = fl.apply()
    assert set(placed) == {"grid-jp-a", "grid-jp-b", "grid-jp-c", "trend-us"}
    assert placed["trend-us"] == "us-1"
    jp = [placed[s] for s in ("grid-jp-a", "grid-jp-b", "grid-jp-c")]
    assert set(jp) == {"jp-1", "jp-2"}, f"load-based placement should use both JP workers: {placed}"

    # The runners really run on the hosts: one per strategy, as the login user, from the workdir of
    # the worker it was placed on, with that worker's id and region in its environment.
    region = {"jp-1": "JP", "jp-2": "JP", "us-1": "US"}
    runners = fl.wait_runners(placed)
    for sid, proc in runners.items():
        env = proc.environ()
        wid = placed[sid]
        assert env["QUANTLAB_WORKER_ID"] == wid
        assert env["QUANTLAB_REGION"] == region[wid]
        assert proc.uid == fl.login_uid, f"{sid}: runner runs as uid {proc.uid}, not {fl.cluster.user}"
        assert fl.host_of_path(proc.argv[1]) == fl.worker_hosts[wid], proc.cmdline
        assert proc.argv[1].startswith(str(fl.workdir(wid)) + "/agent/runner-"), proc.cmdline
        assert env["QUANTLAB_STATE_DIR"] == str(fl.instance_dir(wid, sid) / "state")

    # status --output json, once every runner has reported a heartbeat.
    def all_running():
        report = fl.status()
        return report if all(s["status"] == "running" for s in report["strategies"]) else None
    report = wait_for(all_running, 20, "every strategy running in `status`")
    strategies = {s["id"]: s for s in report["strategies"]}
    assert set(strategies) == set(placed)
    for sid, s in strategies.items():
        assert s["workerId"] == placed[sid]
        assert s["healthy"] is True and s["workerStatus"] == "online"
        assert s["upToDate"] is True and s["errorCount"] == 0
    workers = {w["id"]: w for w in report["workers"]}
    assert set(workers) == {"jp-1", "jp-2", "us-1"}
    for wid, w in workers.items():
        assert w["status"] == "busy" and w["error"] is None
        assert w["region"] == region[wid] and w["host"] == fl.worker_hosts[wid]
        assert sorted(w["runningStrategies"]) == sorted(s for s, at in placed.items() if at == wid)
        assert w["versions"]["python"] and w["versions"]["node"].startswith("v")

    # The supervisors hold their copies' lease keys: undumpable, so a strategy of the same uid can
    # neither ptrace them nor read their memory or environment.
    for sid, wid in placed.items():
        pid = int((fl.instance_dir(wid, sid) / "supervisor.pid").read_text().split()[0])
        uid = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Uid:"))
        assert uid == fl.login_uid, (sid, pid, uid)
        peek = subprocess.run(["cat", f"/proc/{pid}/environ"], preexec_fn=lambda: os.setuid(uid),
                              capture_output=True, text=True, timeout=30)
        assert peek.returncode != 0 and "Permission denied" in peek.stderr, (sid, peek.stderr)

    # Nothing more to do.
    again = fl.cli("plan", "--detailed-exitcode")
    assert "No changes." in again.out, again.describe()
    assert len(fl.runners()) == 4


@pytest.mark.slow
def test_worker_behind_a_proxyjump_host(ssh_fleet):
    fl = ssh_fleet(3)
    h1, h3 = fl.hosts["host-01"], fl.hosts["host-03"]
    # `behind-01` is host-03's sshd, reachable only "through" host-01.
    fl.ssh["config"] = str(ssh_config_with_jump(fl, "behind-01", h3, "host-01"))
    fl.worker("jp-far", "behind-01", on="host-03", region="JP")
    fl.strategy("grid-far", region="JP")
    fl.write()
    accepted_before = h1.log_text().count("Accepted publickey")

    placed = fl.apply()
    assert placed == {"grid-far": "jp-far"}
    runner = fl.wait_runners(placed)["grid-far"]
    assert fl.host_of_path(runner.argv[1]) == "host-03"
    assert runner.environ()["QUANTLAB_WORKER_ID"] == "jp-far"
    # host-01 served the jump: it logged a login although no worker of the fleet lives on it.
    assert h1.log_text().count("Accepted publickey") > accepted_before

    # Without the jump host the worker is unreachable, and the error names the jump.
    h1.stop()
    report = fl.status()
    worker = report["workers"][0]
    assert worker["status"] == "unreachable", worker
    assert "host-01" in worker["error"] and "refused" in worker["error"], worker["error"]


@pytest.mark.slow
def test_worker_behind_a_chain_of_two_jump_hosts(ssh_fleet):
    """`ProxyJump host-01,host-02`: like OpenSSH, the target is reached through host-02, itself
    reached through host-01."""
    fl = ssh_fleet(3)
    h1, h2, h3 = fl.hosts["host-01"], fl.hosts["host-02"], fl.hosts["host-03"]
    fl.ssh["config"] = str(ssh_config_with_jump(fl, "behind-two", h3, "host-01,host-02"))
    fl.worker("jp-far", "behind-two", on="host-03", region="JP")
    fl.strategy("grid-far", region="JP")
    fl.write()
    before = {h.name: h.log_text().count("Accepted publickey") for h in (h1, h2)}

    placed = fl.apply()
    assert placed == {"grid-far": "jp-far"}
    runner = fl.wait_runners(placed)["grid-far"]
    assert fl.host_of_path(runner.argv[1]) == "host-03"
    for h in (h1, h2):       # both hops logged a login, though no worker lives on them
        assert h.log_text().count("Accepted publickey") > before[h.name], h.name

    # The first hop gone: unreachable, and the error names the hop that refused.
    h1.stop()
    worker = fl.status()["workers"][0]
    assert worker["status"] == "unreachable", worker
    assert "host-01" in worker["error"] and "refused" in worker["error"], worker["error"]


@pytest.mark.slow
def test_params_with_shell_metacharacters_reach_the_runner_verbatim(ssh_fleet):
    fl = ssh_fleet(1)
    root = fl.hosts["host-01"].workdir_root
    mark = f"{root}/pwned"
    params = {
        "subst": f"$(touch {mark}-subst)",
        "backticks": f"`touch {mark}-bt`",
        "semicolon": f"x; touch {mark}-semi",
        "and": f"x && touch {mark}-and #",
        "pipe": f"x | touch {mark}-pipe",
        "redirect": f"x > {mark}-redir",
        "single": f"it's '; touch {mark}-sq; echo '",
        "double": f"\"; touch {mark}-dq; echo \"",
        "newlines": f"one\ntouch {mark}-nl\nthree\n",
        "dollars": "$HOME ${PATH} $$ $0 $1",
        "glob": "* ? [a-z] ~",
        "backslashes": "back\\slash \\n \\\\",
        "unicode": "日本語 ✓ \u00e9",
        "nested": {"list": [f"$(touch {mark}-nested)", "`id`", "a'b\"c", 7, 1.5, None, True]},
    }
    fl.worker("w-1", "host-01")
    fl.strategy("meta", params=params)
    fl.write()

    placed = fl.apply()
    runner = fl.wait_runners(placed)["meta"]
    assert json.loads(runner.environ()["QUANTLAB_PARAMS"]) == params

    # And the strategy itself got them as ctx.params (it saves them in its checkpoint).
    state_file = fl.instance_dir("w-1", "meta") / "state" / "state.json"
    state = wait_for(lambda: state_file.exists() and json.loads(state_file.read_text()), 10, "a checkpoint")
    assert state["params"] == params

    # No shell ever ran any of it: no marker anywhere the login user could write.
    leaked = [os.path.join(d, f) for d, _, files in os.walk(fl.cluster.shared_dir) for f in files if "pwned" in f]
    home = os.path.expanduser(f"~{fl.cluster.user}")
    leaked += [os.path.join(d, f) for d, _, files in os.walk(home) for f in files if "pwned" in f]
    assert not leaked


def test_a_host_without_sftp_gets_its_files_over_the_command_channel(ssh_fleet):
    # Hardened sshd configurations often leave out `Subsystem sftp`: the agent, the runner and the
    # strategy file still reach the host, and the strategy runs.
    fl = ssh_fleet(1, cluster_kwargs={"sftp": False})
    assert "Subsystem" not in fl.cluster.hosts[0].config_path.read_text()
    fl.worker("w-1", "host-01").strategy("no-sftp")
    fl.write()
    placed = fl.apply()
    assert placed == {"no-sftp": "w-1"}
    runner = fl.wait_runners(placed)["no-sftp"]
    assert runner.argv[1].startswith(str(fl.workdir("w-1")) + "/agent/runner-"), runner.cmdline
    uploaded = [p for p in (fl.workdir("w-1") / "files").iterdir()]
    assert [p.suffix for p in uploaded] == [".mjs"] and not [p for p in uploaded if ".tmp-" in p.name]
