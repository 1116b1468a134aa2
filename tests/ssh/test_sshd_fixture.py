"""Tests of the sshd fixture itself, against real OpenSSH daemons, with
paramiko and host-key checking ON (generated known_hosts + RejectPolicy)."""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import socket
import time

import paramiko
import pytest

from tests.sshd_hosts import SshdCluster, SshdHost, _ProcRef

pytestmark = pytest.mark.ssh


def connect(cluster: SshdCluster, host: SshdHost, t: float = 5.0, known_hosts=None) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts or cluster.known_hosts_path))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(**host.connect_kwargs(), timeout=t, banner_timeout=t, auth_timeout=t, channel_timeout=t)
    except BaseException:
        client.close()  # stops the transport thread of a failed attempt
        raise
    return client


def run(client: paramiko.SSHClient, cmd: str, timeout: float = 10.0) -> tuple[int, str, str]:
    _, out, err = client.exec_command(cmd, timeout=timeout)
    o, e = out.read().decode(), err.read().decode()
    return out.channel.recv_exit_status(), o, e


def expected_shell_name(cluster: SshdCluster) -> str:
    return os.path.basename(pwd.getpwnam(cluster.user).pw_shell)


def test_three_hosts_accept_client_key_as_dedicated_user(sshd_cluster):
    cluster = sshd_cluster(3)
    assert [h.name for h in cluster.hosts] == ["host-01", "host-02", "host-03"]
    assert len({h.port for h in cluster.hosts}) == 3
    if os.geteuid() == 0:
        assert cluster.user == "qltest"
        assert pwd.getpwnam("qltest").pw_shell == "/bin/sh"

    kh = cluster.known_hosts_path.read_text().splitlines()
    assert kh == [f"[127.0.0.1]:{h.port} {h.host_public_key}" for h in cluster.hosts]
    assert all(h.host_public_key.startswith("ssh-ed25519 AAAA") for h in cluster.hosts)
    cfg = cluster.ssh_config_path.read_text()
    for h in cluster.hosts:
        assert f"Host {h.name}\n    HostName 127.0.0.1\n    Port {h.port}\n    User {cluster.user}\n" in cfg
    assert "StrictHostKeyChecking yes" in cfg

    for h in cluster.hosts:
        assert cluster.host(h.name) is h
        with connect(cluster, h) as client:
            code, out, err = run(client, f"id -un; echo $0; touch {h.workdir_root}/probe && echo writable")
            assert code == 0, err
            assert out.split() == [cluster.user, expected_shell_name(cluster), "writable"]
        assert (h.workdir_root / "probe").stat().st_uid == pwd.getpwnam(cluster.user).pw_uid


def test_known_hosts_lookup_plain_and_hashed(sshd_cluster):
    cluster = sshd_cluster(2, hashed_known_hosts=True)
    assert all(line.startswith("|1|") for line in cluster.known_hosts_path.read_text().splitlines())
    keys = paramiko.HostKeys(str(cluster.known_hosts_path))
    h1, h2 = cluster.hosts
    server_key = paramiko.PKey.from_type_string("ssh-ed25519", base64.b64decode(h1.host_public_key.split()[1]))
    assert keys.lookup(f"[127.0.0.1]:{h1.port}") is not None
    assert keys.check(f"[127.0.0.1]:{h1.port}", server_key)
    assert not keys.check(f"[127.0.0.1]:{h2.port}", server_key)
    assert keys.lookup("127.0.0.1") is None  # port is part of the name
    with connect(cluster, h2) as client:  # SSHClient resolves hashed entries too
        assert run(client, "echo ok")[1] == "ok\n"


def test_unknown_and_changed_host_keys_are_rejected(sshd_cluster, tmp_path):
    cluster = sshd_cluster(2)
    h1, h2 = cluster.hosts
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        connect(cluster, h1, known_hosts=empty)

    old_key = h1.host_public_key
    new_key = h1.regenerate_host_key()
    assert new_key != old_key and h1.running
    with pytest.raises(paramiko.BadHostKeyException):
        connect(cluster, h1)
    with connect(cluster, h2) as client:  # the other host is untouched
        assert run(client, "echo ok")[1] == "ok\n"

    cluster.write_known_hosts()  # accept the new key
    with connect(cluster, h1) as client:
        assert run(client, "echo ok")[1] == "ok\n"


def test_stop_refuses_fast_and_start_restores(sshd_cluster):
    cluster = sshd_cluster(2)
    h, other = cluster.hosts
    port, listener = h.port, h.pid
    client = connect(cluster, h)
    _, out, _ = client.exec_command("sleep 60")  # a session that stays open
    time.sleep(0.2)
    sessions = h.session_pids()
    assert sessions, "an open connection has per-connection processes"
    refs = [_ProcRef.of(p) for p in [listener, *sessions]]

    h.stop()
    assert h.pid is None and not h.running
    assert not any(r and r.alive() for r in refs)
    t0 = time.monotonic()
    with pytest.raises(paramiko.ssh_exception.NoValidConnectionsError):
        connect(cluster, h)
    assert time.monotonic() - t0 < 1.0
    out.channel.settimeout(5)
    assert out.read() == b""  # the open session was cut (EOF, not a hang)
    with pytest.raises((EOFError, OSError, paramiko.SSHException)):
        run(client, "echo still-here", timeout=2)
    client.close()
    with connect(cluster, other) as c2:  # other hosts are unaffected
        assert run(c2, "echo ok")[1] == "ok\n"

    h.start()
    assert h.port == port and h.pid not in (None, listener)
    with connect(cluster, h) as c3:  # same port, same host key: known_hosts still valid
        assert run(c3, "echo back")[1] == "back\n"


def test_stop_keeping_sessions_then_stop_all_kills_them(sshd_cluster):
    cluster = sshd_cluster(1)
    (h,) = cluster.hosts
    client = connect(cluster, h)
    h.stop(kill_sessions=False)  # like 'systemctl restart ssh'
    assert run(client, "echo alive")[1] == "alive\n"  # open connection survives
    left = h.session_pids()
    assert left
    with pytest.raises(paramiko.ssh_exception.NoValidConnectionsError):
        connect(cluster, h)
    h.start()
    with connect(cluster, h) as c2:
        assert run(c2, "echo new")[1] == "new\n"
    refs = [_ProcRef.of(p) for p in left]
    cluster.stop_all()
    assert not any(r and r.alive() for r in refs)
    client.close()


def test_freeze_hangs_new_and_open_connections_thaw_restores(sshd_cluster):
    cluster = sshd_cluster(2)
    h, other = cluster.hosts
    client = connect(cluster, h)
    stdin, stdout, _ = client.exec_command("cat", timeout=1.0)
    chan = stdout.channel
    chan.sendall(b"ping\n")
    assert chan.recv(100) == b"ping\n"

    h.freeze()
    assert h.frozen
    states = {_ProcRef.of(p).state() for p in [h.pid, *h.session_pids()]}
    assert states <= {"T", "t"}, states

    # new connection: TCP connects (kernel backlog) but no banner ever comes
    t0 = time.monotonic()
    with pytest.raises((paramiko.SSHException, socket.timeout, EOFError)):
        connect(cluster, h, t=1.0)
    assert time.monotonic() - t0 < 5.0
    # open connection: the running command no longer answers ...
    chan.sendall(b"pong\n")
    with pytest.raises(socket.timeout):
        chan.recv(100)
    # ... and a new command cannot even get a channel
    with pytest.raises(paramiko.SSHException):
        client.exec_command("echo hi", timeout=1.0)
    with connect(cluster, other) as c2:  # other hosts keep working
        assert run(c2, "echo ok")[1] == "ok\n"

    h.thaw()
    assert not h.frozen
    chan.settimeout(10)
    assert chan.recv(100) == b"pong\n"
    stdin.close()
    chan.shutdown_write()
    assert chan.recv_exit_status() == 0
    assert run(client, "echo thawed")[1] == "thawed\n"
    with connect(cluster, h) as c3:
        assert run(c3, "echo fresh")[1] == "fresh\n"
    client.close()


def test_python3_and_node_in_login_session(sshd_cluster):
    cluster = sshd_cluster(1)
    (h,) = cluster.hosts
    with connect(cluster, h) as client:
        # exec (how the orchestrator runs things) and an explicit login shell
        for wrap in ("{}", "sh -lc '{}'"):
            code, out, err = run(client, wrap.format("command -v python3; python3 -c \"print(6*7)\""))
            assert code == 0, err
            path, answer = out.split()
            assert os.path.isabs(path) and answer == "42"
            if shutil.which("node") is None:
                continue  # node is not installed on this machine at all
            code, out, err = run(client, wrap.format("command -v node; node -e \"console.log(6*7)\""))
            assert code == 0, f"node is installed here but not runnable as {cluster.user}: {err}"
            path, answer = out.split()
            assert os.path.isabs(path) and answer == "42"
        # an interactive login session ("-sh") sees the same PATH
        shell = client.invoke_shell()
        shell.settimeout(10)
        shell.sendall(b"echo MARK $0; command -v python3; exit\n")
        buf = b""
        while True:
            data = shell.recv(4096)
            if not data:
                break
            buf += data
        text = buf.decode(errors="replace")
        assert "MARK -" in text and "python3" in text.split("MARK", 1)[1]


def test_distinct_loopback_addresses(sshd_cluster):
    cluster = sshd_cluster(2, distinct_addresses=True)
    assert [h.address for h in cluster.hosts] == ["127.0.0.2", "127.0.0.3"]
    for h in cluster.hosts:
        assert f"[{h.address}]:{h.port} " in cluster.known_hosts_path.read_text()
        with connect(cluster, h) as client:
            assert run(client, "echo $SSH_CONNECTION")[1].split()[2] == h.address


def test_proxy_jump_through_a_host(sshd_cluster):
    cluster = sshd_cluster(2)
    jump, target = cluster.hosts
    with connect(cluster, jump) as jc:
        sock = jc.get_transport().open_channel(
            "direct-tcpip", (target.address, target.port), ("127.0.0.1", 0), timeout=5
        )
        client = paramiko.SSHClient()
        client.load_host_keys(str(cluster.known_hosts_path))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(**target.connect_kwargs(), sock=sock, banner_timeout=5, auth_timeout=5)
            assert run(client, "echo via-jump")[1] == "via-jump\n"
        finally:
            client.close()


def test_teardown_leaves_no_sshd_process(tmp_path):
    cluster = SshdCluster(tmp_path / "c")
    clients = []
    try:
        cluster.start(3)
        clients = [connect(cluster, h) for h in cluster.hosts]
        for c in clients:
            c.exec_command("sleep 60")
        time.sleep(0.2)
        cluster.hosts[1].freeze()  # teardown must cope with a frozen host
        pids = cluster.all_pids()
        assert len(pids) > 3
        refs = [_ProcRef.of(p) for p in pids]
        t0 = time.monotonic()
        cluster.stop_all()
        assert time.monotonic() - t0 < 5
        assert not [r.pid for r in refs if r and r.alive()]
        assert all(h.pid is None for h in cluster.hosts)
        cluster.stop_all()  # idempotent
    finally:
        cluster.stop_all()
        for c in clients:
            c.close()
