"""One probe tick over N real sshd hosts: quantlab cold and warm, against ansible and a bare floor.

For each N (default 10, 30, 60) this starts N OpenSSH daemons on loopback with the test fixture, puts
three workers with running instances on each (a shell stub runner that honours the heartbeat file
stands in for node, to fit 2 cores), and measures, median of --repeat runs:

- quantlab cold: a fresh controller probes every host (new connections: TCP, key exchange, auth,
  the agent shipped and its kept agent started);
- quantlab warm: the same controller probes again over its kept connections, through its own Prober
  (the one the daemon keeps across rounds, which knows which hosts are warm) and kept agents;
- floor: the same probe as a call of its own (`python3 agent.pyz probe`, an interpreter per call)
  over already-open paramiko connections from a thread pool, with no quantlab logic at all — what
  quantlab did before it kept an agent on each host;
- ansible: `ansible all -m command -a '<same probe>' -f N` over the same hosts, host key checking on.

Controller CPU per tick is the benchmark process's CPU time for quantlab and the floor, and the
children's CPU time for ansible. Host CPU per tick is reported apart: the CPU of every sshd process
of the hosts and of what they ran and reaped (the agent's calls, their interpreters) — the cost a
probe puts on a trading host. Every instance started is stopped at the end; the run fails if a
process it started is left. Run it in its own environment (ansible-core and matplotlib are not
quantlab dependencies):

    python3 -m venv benchmarks/.venv && benchmarks/.venv/bin/pip install ansible-core matplotlib -e .
    benchmarks/.venv/bin/python benchmarks/probe_fanout.py [--hosts 10,30,60] [--repeat 5]

It writes the table and a plot into benchmarks/README.md and benchmarks/probe_fanout.png.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paramiko  # noqa: E402

from quantlab.app.controller import Controller  # noqa: E402
from quantlab.edges.hosts import AGENT_PATH, HostKey  # noqa: E402
from tests.sshd_hosts import SshdCluster, _descendants  # noqa: E402
from tests.support import kill_all, processes  # noqa: E402

WORKERS_PER_HOST = 3
STUB_RUNNER = (
    "trap 'exit 0' TERM; while :; do "
    "printf '{\"t\":%s000,\"beats\":1,\"errorCount\":0,\"lastError\":null,\"paused\":false}' \"$(date +%s)\" "
    "> \"$QUANTLAB_HEARTBEAT_FILE.tmp\" && mv \"$QUANTLAB_HEARTBEAT_FILE.tmp\" \"$QUANTLAB_HEARTBEAT_FILE\"; "
    "sleep 20 & wait $!; done"
)


def write_fleet(root: Path, cluster: SshdCluster) -> None:
    (root / "strategies").mkdir(parents=True)
    (root / "strategies" / "stub.js").write_text("// the stub runner never loads this\n")
    (root / "fleet.yaml").write_text(
        "apiVersion: quantlab/v1\nkind: Fleet\n"
        "monitor: {leaseTtlSeconds: 0}\n"
        f"ssh: {{config: {cluster.ssh_config_path}, knownHosts: {cluster.known_hosts_path}, "
        f"parallelism: 64, connectTimeoutSeconds: 30, commandTimeoutSeconds: 60}}\n")
    workers, strategies = [], []
    for h in cluster.hosts:
        for k in range(WORKERS_PER_HOST):
            wid = f"{h.name}-w{k}"
            workers.append(
                f"apiVersion: quantlab/v1\nkind: Worker\nid: {wid}\nhost: {h.name}\n"
                f"workdir: {h.workdir_root}/{wid}\n"
                f"capabilities: {{maxStrategies: 1, supportedApis: [paper]}}\n"
                f"runner: [sh, -c, {json.dumps(STUB_RUNNER)}]\n")
            strategies.append(
                f"apiVersion: quantlab/v1\nkind: Strategy\nid: s-{wid}\nstrategyFile: strategies/stub.js\n"
                f"heartbeatMs: 20000\nrequirements: {{api: paper}}\n")
    (root / "workers.yaml").write_text("---\n".join(workers))
    (root / "strategies.yaml").write_text("---\n".join(strategies))


def timed(fn, cpu=time.process_time):
    wall, used = time.perf_counter(), cpu()
    fn()
    return time.perf_counter() - wall, cpu() - used


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def host_cpu(cluster: SshdCluster) -> float:
    """CPU seconds the hosts' sshd daemons, their sessions and everything those ran and reaped have
    used so far (a supervisor is not among them: it leaves its session at start)."""
    total = 0
    for h in cluster.hosts:
        for pid in [h.pid, *_descendants(h.pid)] if h.pid else []:
            try:
                fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(x) for x in fields[11:15])        # utime stime cutime cstime
    return total / CLOCK_TICKS


def idle_cpu_per_connection(n: int, seconds: float = 5.0) -> float:
    """This process's CPU per second per kept connection while nothing is asked of them."""
    used = time.process_time()
    time.sleep(seconds)
    return (time.process_time() - used) / seconds / n


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def probe_request(fleet, hosts, host_name: str) -> dict:
    workers = [w for w in fleet.workers.values() if w.host == host_name]
    return {"workers": [{"id": w.id, "workdir": hosts.workdir(w), "program": w.runner[0]} for w in workers]}


def measure(n: int, repeat: int, base: Path) -> dict:
    with SshdCluster(base / f"hosts-{n}") as cluster:
        cluster.start(n)
        fleet_dir = base / f"fleet-{n}"
        write_fleet(fleet_dir, cluster)
        ctl = Controller(fleet_dir, fleet_dir / ".quantlab" / "state.json")
        subprocess.run([sys.executable, "-m", "quantlab", "apply", "--fleet", str(fleet_dir), "--yes"],
                       check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        fleet = ctl.load_fleet()
        memory = ctl.store.load()
        ctl.close()

        # Every host now has the agent; write each host's probe request next to it for ansible.
        hosts = ctl.hosts(fleet)
        commands = {}
        for h in cluster.hosts:
            request = probe_request(fleet, hosts, h.name)
            home = request["workers"][0]["workdir"]
            req_path = f"{home}/probe-request.json"
            hosts.transport(HostKey(h.name)).put_file(json.dumps(request).encode(), req_path)
            commands[h.name] = (f"python3 -I -S {home}/{AGENT_PATH} probe --request {req_path}", request)
        ctl.close()

        answered = {}

        def quantlab_tick(c: Controller):
            # The daemon's own Prober, kept by the controller across rounds (not a throwaway one).
            g = c.prober(fleet).round(fleet, memory, deadline_s=60.0)
            answered["n"] = sum(1 for s in g.observed.workers.values() if s.reachable)

        cold, cold_cpu, warm, warm_cpu, warm_host, idle_cpu = [], [], [], [], [], []
        for _ in range(repeat):
            c = Controller(fleet_dir, fleet_dir / ".quantlab" / "state.json")
            wall, cpu = timed(lambda: quantlab_tick(c))
            cold.append(wall), cold_cpu.append(cpu)
            assert answered["n"] == n * WORKERS_PER_HOST, answered
            for _ in range(repeat):
                before = host_cpu(cluster)
                wall, cpu = timed(lambda: quantlab_tick(c))
                warm_host.append(host_cpu(cluster) - before)
                assert answered["n"] == n * WORKERS_PER_HOST, answered
                warm.append(wall), warm_cpu.append(cpu)
            idle_cpu.append(idle_cpu_per_connection(n))      # the kept connections, doing nothing
            c.close()

        # The floor: bare paramiko, connections already open, one exec per host from a thread pool.
        clients = {}
        for h in cluster.hosts:
            client = paramiko.SSHClient()
            client.load_system_host_keys(str(cluster.known_hosts_path))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            client.connect(h.address, h.port, username=cluster.user, key_filename=str(cluster.client_key_path),
                           allow_agent=False, look_for_keys=False)
            clients[h.name] = client

        def bare(name: str) -> None:
            command, _ = commands[name]
            _, stdout, _ = clients[name].exec_command(command)
            json.loads(stdout.read())

        def interpreter(name: str) -> None:
            _, stdout, _ = clients[name].exec_command("python3 -I -S -c pass")
            stdout.read()

        floor_idle = idle_cpu_per_connection(n)     # plain paramiko clients, kept open the same way
        floor, floor_cpu, interpreter_host = [], [], []
        with ThreadPoolExecutor(max_workers=n) as pool:
            for _ in range(repeat):
                wall, cpu = timed(lambda: list(pool.map(bare, clients)))
                floor.append(wall), floor_cpu.append(cpu)
            # The host's floor for any call that starts an interpreter: a bare one, over the same sessions.
            for _ in range(repeat):
                before = host_cpu(cluster)
                list(pool.map(interpreter, clients))
                interpreter_host.append(host_cpu(cluster) - before)
        for client in clients.values():
            client.close()

        ansible = run_ansible(cluster, commands, n, repeat, base)
        # Nothing this run started is left: the instances' supervisors (and their runners) are stopped.
        left = kill_all(str(base))
        if left or processes(str(base)):
            sys.exit(f"processes left behind: {[p.argv for p in left]}")
        return {
            "n": n, "cold": statistics.median(cold), "cold_cpu": statistics.median(cold_cpu),
            "warm": statistics.median(warm), "warm_cpu": statistics.median(warm_cpu),
            "host_cpu_per_probe": statistics.median(warm_host) / n,
            "host_cpu_per_interpreter": statistics.median(interpreter_host) / n,
            "idle_cpu_per_connection": statistics.median(idle_cpu), "floor_idle_cpu_per_connection": floor_idle,
            "floor": statistics.median(floor), "floor_cpu": statistics.median(floor_cpu), **ansible,
        }


def run_ansible(cluster: SshdCluster, commands: dict, n: int, repeat: int, base: Path) -> dict:
    ansible = shutil.which("ansible", path=str(Path(sys.executable).parent)) or shutil.which("ansible")
    if ansible is None:
        return {"ansible": None, "ansible_cpu": None, "ansible_first": None}
    folder = base / f"ansible-{n}"
    (folder / "host_vars").mkdir(parents=True)
    lines = ["[all]"]
    for h in cluster.hosts:
        lines.append(f"{h.name} ansible_host={h.address} ansible_port={h.port} ansible_user={cluster.user} "
                     f"ansible_ssh_private_key_file={cluster.client_key_path}")
        agent, req = commands[h.name][0].split()[3::3]
        (folder / "host_vars" / f"{h.name}.yml").write_text(f"agent: {agent}\nrequest: {req}\n")
    inventory = folder / "inventory.ini"
    inventory.write_text("\n".join(lines) + "\n")
    # Each host's own probe command (its workdirs differ) comes from its host_vars.
    command = "python3 -I -S {{ agent }} probe --request {{ request }}"
    env = dict(os.environ, ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_PYTHON_INTERPRETER="/usr/bin/python3",
               ANSIBLE_SSH_ARGS=f"-o UserKnownHostsFile={cluster.known_hosts_path} -o StrictHostKeyChecking=yes "
                                "-o ControlMaster=auto -o ControlPersist=60s",
               ANSIBLE_CONTROL_PATH_DIR=str(folder / "cp"), ANSIBLE_LOCAL_TEMP=str(folder / "tmp"))
    times, cpus = [], []
    for _ in range(repeat + 1):           # the first run opens the ControlPersist masters
        before = children_cpu()
        start = time.perf_counter()
        done = subprocess.run([ansible, "all", "-i", str(inventory), "-m", "command", "-a", command,
                               "-f", str(n)], capture_output=True, env=env)
        times.append(time.perf_counter() - start)
        cpus.append(children_cpu() - before)
        if done.returncode != 0:
            sys.exit(f"ansible failed:\n{done.stdout.decode()[-3000:]}\n{done.stderr.decode()[-3000:]}")
    return {"ansible_first": times[0], "ansible": statistics.median(times[1:]),
            "ansible_cpu": statistics.median(cpus[1:])}


def write_report(rows: list[dict], out_dir: Path) -> None:
    header = ("| hosts (×3 workers) | quantlab cold | quantlab warm | floor (a call of its own, bare paramiko, open) | ansible "
              "(median; first run) | warm vs ansible | warm vs floor | cold vs ansible | controller CPU per tick: "
              "cold / warm / floor / ansible | host CPU per probe (warm) vs a bare interpreter | idle controller CPU per "
              "kept connection vs plain paramiko |")
    lines = [header, "|" + " --- |" * 11]
    for r in rows:
        a = r["ansible"]
        lines.append(
            f"| {r['n']} | {r['cold']:.3f} s | {r['warm']:.3f} s | {r['floor']:.3f} s | "
            + (f"{a:.2f} s; {r['ansible_first']:.2f} s" if a else "n/a") + " | "
            + (f"{a / r['warm']:.0f}× faster" if a else "n/a") + " | "
            + f"{r['warm'] / r['floor']:.2f}× | "
            + (f"{r['cold'] / a:.2f}×" if a else "n/a") + " | "
            + f"{r['cold_cpu']:.2f} / {r['warm_cpu']:.3f} / {r['floor_cpu']:.3f} / "
            + (f"{r['ansible_cpu']:.2f} s" if a else "n/a") + " | "
            + f"{1000 * r['host_cpu_per_probe']:.1f} ms vs {1000 * r['host_cpu_per_interpreter']:.1f} ms "
            + f"({r['host_cpu_per_probe'] / r['host_cpu_per_interpreter']:.1f}×) | "
            + f"{1000 * r['idle_cpu_per_connection']:.3f} vs {1000 * r['floor_idle_cpu_per_connection']:.3f} ms/s |")
    table = "\n".join(lines)
    print(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        ns = [r["n"] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(ns, [r["cold"] for r in rows], "o-", label="quantlab cold")
        ax.plot(ns, [r["warm"] for r in rows], "o-", label="quantlab warm")
        ax.plot(ns, [r["floor"] for r in rows], "x--", label="floor: bare paramiko, open connections")
        if all(r["ansible"] for r in rows):
            ax.plot(ns, [r["ansible"] for r in rows], "s-", label="ansible -m command -f N")
        ax.set_xlabel("sshd hosts (3 workers each)")
        ax.set_ylabel("one probe tick, seconds (median)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "probe_fanout.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot")
    readme = out_dir / "README.md"
    text = readme.read_text() if readme.exists() else ""
    start, end = "<!-- probe_fanout:start -->", "<!-- probe_fanout:end -->"
    block = f"{start}\n{table}\n\n![probe tick time against N](probe_fanout.png)\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    readme.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", default="10,30,60")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="quantlab-fanout-") as tmp:
        for n in (int(x) for x in args.hosts.split(",")):
            row = measure(n, args.repeat, Path(tmp))
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_report(rows, Path(__file__).resolve().parent)


if __name__ == "__main__":
    main()
