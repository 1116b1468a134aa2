"""known_hosts and ssh_config files are parsed once while unchanged and shared by every connection
(a cold round over N hosts parsed N lines N times); a changed file is read again."""
from __future__ import annotations

import os

import paramiko
import pytest

from quantlab.core.spec import SshSettings
from quantlab.edges.transport.ssh import KnownHostsUnreadable, known_hosts, load_ssh_config, resolve


def line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}\n"


def test_known_hosts_are_parsed_once_while_the_file_is_unchanged(tmp_path):
    first, second = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    path = tmp_path / "known_hosts"
    path.write_text(line("[host-01]:2201", first))
    paths = (str(path), str(tmp_path / "absent"))
    keys = known_hosts(paths)
    assert known_hosts(paths) is keys
    assert keys.lookup("[host-01]:2201")[first.get_name()] == first

    with open(path, "a") as handle:               # accept-new appends a line: read again
        handle.write(line("[host-02]:2202", second))
    again = known_hosts(paths)
    assert again is not keys
    assert again.lookup("[host-02]:2202")[second.get_name()] == second
    assert again.lookup("[host-01]:2201")[first.get_name()] == first


def test_an_unreadable_known_hosts_names_its_file(tmp_path):
    path = tmp_path / "known_hosts"
    path.mkdir()                                  # a folder where the file should be
    with pytest.raises(KnownHostsUnreadable) as raised:
        known_hosts((str(path),))
    assert raised.value.path == str(path)
    os.rmdir(path)


def test_ssh_config_is_parsed_and_looked_up_once_while_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "ssh_config"
    path.write_text("".join(f"Host host-{n:02d}\n  HostName 127.0.0.{n}\n  Port {2200 + n}\n" for n in range(1, 40)))
    settings = SshSettings(config=str(path))
    config = load_ssh_config(str(path))
    assert load_ssh_config(str(path)) is config
    looked = []
    real = paramiko.SSHConfig.lookup
    monkeypatch.setattr(paramiko.SSHConfig, "lookup", lambda self, alias: looked.append(alias) or real(self, alias))
    for _ in range(3):
        endpoint = resolve("host-07", None, None, settings, load_ssh_config(str(path)))
        assert (endpoint.hostname, endpoint.port) == ("127.0.0.7", 2207)
    assert looked == ["host-07"]

    path.write_text("Host host-07\n  HostName 127.0.1.7\n  Port 2299\n")     # edited: read again
    endpoint = resolve("host-07", None, None, settings, load_ssh_config(str(path)))
    assert (endpoint.hostname, endpoint.port) == ("127.0.1.7", 2299)
