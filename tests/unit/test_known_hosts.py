"""known_hosts files are parsed once while unchanged and shared by every connection (a cold round
over N hosts parsed N lines N times); a changed file is read again."""
from __future__ import annotations

import os

import paramiko
import pytest

from quantlab.edges.transport.ssh import KnownHostsUnreadable, known_hosts


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
