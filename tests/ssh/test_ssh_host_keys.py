"""Host keys: an unknown key is refused with its fingerprint and the command that trusts it; a
changed key is refused loudly and never recorded; --accept-new-host-keys records the keys of new
hosts only (like OpenSSH's StrictHostKeyChecking=accept-new)."""
from __future__ import annotations

import base64
import hashlib
import re

import pytest

pytestmark = pytest.mark.ssh


def fingerprint(public_key_line: str) -> str:
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def fleet_with_own_known_hosts(ssh_fleet, known_hosts_text: str):
    """Three workers, one per host, checked against a known_hosts file of the test's own (the
    cluster's ssh_config names its known_hosts in UserKnownHostsFile: that line is dropped)."""
    fl = ssh_fleet(3, connect_timeout=3, command_timeout=5)
    config = fl.root / "ssh_config"
    config.write_text("".join(line for line in fl.cluster.ssh_config_path.read_text().splitlines(keepends=True)
                              if "UserKnownHostsFile" not in line))
    known = fl.root / "known_hosts"
    known.write_text(known_hosts_text)
    fl.ssh.update(config=str(config), knownHosts=str(known))
    for i, name in enumerate(("host-01", "host-02", "host-03"), start=1):
        fl.worker(f"w-{i}", name)
    fl.write()
    return fl, known


def line_of(host) -> str:
    return f"{host.known_hosts_name} {host.host_public_key}\n"


def errors(fl, *extra: str) -> dict[str, str | None]:
    report = fl.cli("status", "--output", "json", *extra).json()
    return {w["id"]: w["error"] for w in report["workers"]}


def test_unknown_host_key_is_refused_with_fingerprint_and_keyscan_hint(ssh_fleet):
    fl, known = fleet_with_own_known_hosts(ssh_fleet, "")
    seen = errors(fl)
    for i, name in enumerate(("host-01", "host-02", "host-03"), start=1):
        host, error = fl.hosts[name], seen[f"w-{i}"]
        assert error is not None and "unknown host key" in error, error
        assert fingerprint(host.host_public_key) in error, error
        assert f"ssh-keyscan -p {host.port} {host.address} >> {known}" in error, error
        assert "--accept-new-host-keys" in error
    assert known.read_text() == ""

    plan = fl.cli("plan")
    assert "unknown host key" in plan.out and "ssh-keyscan" in plan.out, plan.describe()
    assert known.read_text() == ""


def test_changed_host_key_is_refused_loudly_and_known_hosts_is_unchanged(ssh_fleet):
    fl = ssh_fleet(3, connect_timeout=3, command_timeout=5)
    for i, name in enumerate(("host-01", "host-02", "host-03"), start=1):
        fl.worker(f"w-{i}", name)
    fl.write()
    known = fl.cluster.known_hosts_path
    assert all(e is None for e in errors(fl).values())
    before = known.read_bytes()
    old = fl.hosts["host-02"].host_public_key
    new = fl.hosts["host-02"].regenerate_host_key()
    assert new != old

    for extra in ((), ("--accept-new-host-keys",)):
        seen = errors(fl, *extra)
        error = seen["w-2"]
        assert error is not None and "HOST KEY CHANGED" in error, error
        assert fingerprint(new) in error and fingerprint(old) in error, error
        assert "ssh-keygen -R" in error
        assert seen["w-1"] is None and seen["w-3"] is None, seen
        assert known.read_bytes() == before

    plan = fl.cli("plan", "--accept-new-host-keys")
    assert "HOST KEY CHANGED" in plan.out, plan.describe()
    assert known.read_bytes() == before


def test_accept_new_host_keys_records_new_hosts_only(ssh_fleet):
    fl, known = fleet_with_own_known_hosts(ssh_fleet, "")
    h1, h2, h3 = (fl.hosts[n] for n in ("host-01", "host-02", "host-03"))
    # host-01 is known as it is; host-03 is known with a key it no longer has; host-02 is new.
    old3 = h3.host_public_key
    before = line_of(h1) + line_of(h3)
    known.write_text(before)
    new3 = h3.regenerate_host_key()

    seen = errors(fl, "--accept-new-host-keys")
    assert seen["w-1"] is None and seen["w-2"] is None, seen
    assert "HOST KEY CHANGED" in seen["w-3"], seen["w-3"]
    after = known.read_text()
    assert after.startswith(before)
    added = after[len(before):].splitlines()
    assert len(added) == 1, after
    name, keytype, key = added[0].split()
    assert name == h2.known_hosts_name and f"{keytype} {key}" == h2.host_public_key
    assert new3.split()[1] not in after and old3.split()[1] in after

    # Next time, without the flag: host-02 is known now, host-03 still refused, nothing written.
    seen = errors(fl)
    assert seen["w-1"] is None and seen["w-2"] is None
    assert re.search(r"HOST KEY CHANGED for \[127\.0\.0\.1\]:%d" % h3.port, seen["w-3"]), seen["w-3"]
    assert known.read_text() == after


def test_hashed_known_hosts_are_honoured(ssh_fleet):
    fl = ssh_fleet(2, cluster_kwargs={"hashed_known_hosts": True})
    assert all(line.startswith("|1|") for line in fl.cluster.known_hosts_path.read_text().splitlines())
    fl.worker("w-1", "host-01").worker("w-2", "host-02").write()
    before = fl.cluster.known_hosts_path.read_bytes()
    assert errors(fl, "--accept-new-host-keys") == {"w-1": None, "w-2": None}
    assert fl.cluster.known_hosts_path.read_bytes() == before       # known already: nothing recorded
