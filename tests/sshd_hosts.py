"""Real OpenSSH ``sshd`` daemons on loopback, each playing one fleet "host".

Plain module (no pytest import at module level) so it can be used from
conftest files *and* from benchmark scripts::

    from tests.sshd_hosts import SshdCluster

    with SshdCluster(base_dir) as cluster:
        cluster.start(10)
        h = cluster.host("host-03")
        # paramiko: hostname=h.address, port=h.port, username=cluster.user,
        #           key_filename=cluster.client_key_path,
        #           known hosts: cluster.known_hosts_path
        h.freeze(); ...; h.thaw()

What it does
------------
* one client ed25519 key (``ssh-keygen``, no passphrase) shared by all hosts;
* per host: an ed25519 host key, an ``sshd_config``, a log file (``-E``), a
  listener started as ``sshd -D -f CONFIG -E LOG`` on 127.0.0.1 (or a distinct
  127.0.0.x) and a free port;
* a client ``ssh_config`` (``ssh -F``) and an OpenSSH ``known_hosts``
  (``[127.0.0.1]:PORT ssh-ed25519 ...``, optionally hashed).

Login user
----------
* Running as root (this machine, CI): sshd logs in the dedicated system user
  ``qltest`` whose shell is ``/bin/sh`` (created with ``useradd --system
  --create-home --shell /bin/sh`` when missing).  We do not log in as root,
  because root's ``~/.bashrc`` runs ``pyenv init`` (~0.25 s per SSH session;
  bash sources ~/.bashrc even for ``ssh host cmd``).  The files ``qltest``
  must read or write (authorized_keys, the per-host workdir roots) live in a
  directory it can traverse: ``<base_dir>/shared`` when every ancestor of
  base_dir is searchable by qltest, otherwise a ``mkdtemp`` under /tmp (pytest's
  ``/tmp/pytest-of-root`` is mode 0700), removed again by ``stop_all()``.
  PATH: sshd gives non-root users its compiled-in default PATH
  (``/usr/local/bin:/usr/bin:/bin:/usr/games`` on Debian), which finds
  ``/usr/bin/python3`` and ``/usr/bin/node`` here; nothing under /root (pyenv
  shims) is reachable for qltest anyway.  If a machine only has them
  elsewhere, pass ``login_path=...`` (written as ``SetEnv PATH=...``).
* Running unprivileged: sshd cannot switch users, so it can only log in the
  user running it (the current user) with that user's own login shell (which
  may be slow if it is bash with a heavy ~/.bashrc); privilege separation is
  off; ``PermitRootLogin``/``AllowUsers`` are set for that user.  Everything
  else works the same.

Process model (OpenSSH 9.x): the listener forks a child per connection which
re-execs sshd (``-R``); it has a privsep child and the user's command below
it.  ``freeze()``/``thaw()``/``stop()``/``session_pids()`` walk that tree via
/proc (Linux only).
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import functools
import hashlib
import hmac
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Iterable

__all__ = [
    "DEFAULT_LOGIN_USER",
    "SshdCluster",
    "SshdHost",
    "SshdStartError",
    "find_sshd",
    "find_ssh_keygen",
    "sshd_available",
    "sshd_required_by_env",
    "sshd_version",
    "start_cluster",
]

DEFAULT_LOGIN_USER = "qltest"
LOGIN_SHELL = "/bin/sh"
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_LISTEN_RE = re.compile(r"Server listening on (\S+) port (\d+)")


class SshdStartError(RuntimeError):
    """A daemon did not come up (the message carries the tail of its log)."""


# ---------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------


def _find_tool(name: str, env_var: str) -> str | None:
    override = os.environ.get(env_var)
    if override:
        return override if os.access(override, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return os.path.realpath(found)
    for d in _SBIN_DIRS:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def find_sshd() -> str | None:
    """Absolute path of sshd (sshd refuses to re-exec from a relative path).
    ``QUANTLAB_SSHD`` overrides."""
    return _find_tool("sshd", "QUANTLAB_SSHD")


def find_ssh_keygen() -> str | None:
    return _find_tool("ssh-keygen", "QUANTLAB_SSH_KEYGEN")


@functools.lru_cache(maxsize=None)
def sshd_version(sshd: str | None = None) -> tuple[int, int]:
    """(major, minor) of OpenSSH, (0, 0) if unknown."""
    sshd = sshd or find_sshd()
    if not sshd:
        return (0, 0)
    r = subprocess.run([sshd, "-V"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", r.stderr + r.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def sshd_required_by_env(environ: dict | None = None) -> bool:
    """True when a missing sshd must fail the SSH tests instead of skipping them
    (``CI=true`` or ``QUANTLAB_REQUIRE_SSHD=1``)."""
    env = os.environ if environ is None else environ
    return env.get("CI", "").strip().lower() == "true" or env.get("QUANTLAB_REQUIRE_SSHD", "").strip() == "1"


def _is_root() -> bool:
    return os.geteuid() == 0


@functools.lru_cache(maxsize=None)
def sshd_available() -> tuple[bool, str]:
    """Whether sshd/ssh-keygen exist and a daemon really starts here.

    Returns ``(True, description)`` or ``(False, reason)``.  The probe starts
    one daemon in a temporary directory (~0.1 s) and is cached per process.
    """
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"):
        return False, f"the sshd fixture needs Linux /proc (platform is {sys.platform})"
    sshd = find_sshd()
    if not sshd:
        return False, "sshd not found (install openssh-server; looked in PATH and /usr/sbin, /usr/local/sbin, /sbin)"
    keygen = find_ssh_keygen()
    if not keygen:
        return False, "ssh-keygen not found (install openssh-client)"
    if _is_root():
        try:
            pwd.getpwnam(DEFAULT_LOGIN_USER)
        except KeyError:
            if not _find_tool("useradd", "QUANTLAB_USERADD"):
                return False, f"running as root, user {DEFAULT_LOGIN_USER!r} is missing and useradd is not available"
    try:
        with tempfile.TemporaryDirectory(prefix="quantlab-sshd-probe-") as d:
            cluster = SshdCluster(d)
            try:
                cluster.start(1, timeout=15)
            finally:
                cluster.stop_all()
    except Exception as e:  # noqa: BLE001 - any failure means "not available"
        return False, f"sshd could not be started here: {type(e).__name__}: {e}"
    major, minor = sshd_version(sshd)
    return True, f"{sshd} (OpenSSH {major}.{minor})"


# ---------------------------------------------------------------------------
# /proc helpers
# ---------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, starttime) of a pid, None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parens: split after the last ')'
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return int(rest[1]), rest[0].decode(), int(rest[19])
    except (IndexError, ValueError):
        return None


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _proc_stat(int(entry))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry))
    return children


def _descendants(root: int) -> list[int]:
    children = _children_map()
    out: list[int] = []
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


@dataclasses.dataclass(frozen=True)
class _ProcRef:
    """A pid pinned to its start time, so a recycled pid is never signalled."""

    pid: int
    starttime: int

    @classmethod
    def of(cls, pid: int) -> "_ProcRef | None":
        st = _proc_stat(pid)
        return None if st is None else cls(pid, st[2])

    def state(self) -> str | None:
        st = _proc_stat(self.pid)
        if st is None or st[2] != self.starttime:
            return None
        return st[1]

    def alive(self) -> bool:
        # a zombie (Z) or dead (X) process is gone for our purposes; it is
        # reaped by whoever inherited it
        return self.state() not in (None, "Z", "X")

    def signal(self, sig: int) -> None:
        if self.state() is None:
            return
        try:
            os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_until(predicate, timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 1.5, 0.05)


# ---------------------------------------------------------------------------
# keys, users, files
# ---------------------------------------------------------------------------


def _keygen_many(keygen: str, paths: Iterable[Path], comment: str) -> None:
    """Generate ed25519 keys (no passphrase) in parallel."""
    procs = []
    for p in paths:
        p = Path(p)
        for q in (p, p.with_name(p.name + ".pub")):
            q.unlink(missing_ok=True)
        procs.append(
            (
                p,
                subprocess.Popen(
                    [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(p)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                ),
            )
        )
    errors = []
    for p, proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"{p}: {out.decode(errors='replace').strip()}")
    if errors:
        raise SshdStartError("ssh-keygen failed: " + "; ".join(errors))


def _public_key_line(private_key_path: Path) -> str:
    """'ssh-ed25519 AAAA...' (comment stripped)."""
    parts = Path(str(private_key_path) + ".pub").read_text().split()
    return f"{parts[0]} {parts[1]}"


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def ensure_login_user(name: str = DEFAULT_LOGIN_USER) -> pwd.struct_passwd:
    """(root only) make sure the dedicated login user exists and can log in
    with a key while ``UsePAM no``: sshd rejects accounts whose shadow password
    starts with '!' ("account is locked"), so such a field is set to '*'
    (no password usable, key login allowed)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        useradd = _find_tool("useradd", "QUANTLAB_USERADD")
        if not useradd:
            raise SshdStartError(f"user {name!r} is missing and useradd is not available")
        r = subprocess.run(
            [useradd, "--system", "--create-home", "--shell", LOGIN_SHELL, name],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        # 9 = already exists (another process created it concurrently)
        if r.returncode not in (0, 9):
            raise SshdStartError(f"useradd {name} failed ({r.returncode}): {r.stderr.strip()}")
        pw = pwd.getpwnam(name)
    try:
        with open("/etc/shadow") as f:
            locked = any(
                line.split(":", 2)[0] == name and line.split(":", 2)[1].startswith("!") for line in f
            )
    except OSError:
        locked = False
    if locked:
        usermod = _find_tool("usermod", "QUANTLAB_USERMOD")
        if usermod:
            subprocess.run([usermod, "-p", "*", name], capture_output=True, stdin=subprocess.DEVNULL)
    return pw


def _searchable_by(path: Path, pw: pwd.struct_passwd) -> bool:
    """Whether every directory from / down to ``path`` is searchable (x) by the
    user, judged from the mode bits (we run as root, os.access won't tell)."""
    groups = {pw.pw_gid}
    try:
        import grp

        groups |= {g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem}
    except Exception:  # noqa: BLE001
        pass
    p = Path(path).resolve()
    for d in [*reversed(p.parents), p]:
        try:
            st = d.stat()
        except OSError:
            return False
        if st.st_uid == pw.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _ensure_privsep_dir() -> None:
    # sshd (as root) refuses to start without its privilege separation dir;
    # on Debian it is /run/sshd, normally created by the service unit.
    for d in ("/run/sshd",):
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o755, exist_ok=True)
            os.chmod(d, 0o755)


def _pick_free_ports(addresses: list[str]) -> list[int]:
    """One free port per address (bind to port 0, keep all sockets open while
    picking so the ports are distinct, then release them).  A race with another
    process is still possible; the starter retries on 'Address already in use'."""
    socks = []
    try:
        for addr in addresses:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((addr, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def known_hosts_name(address: str, port: int) -> str:
    """The name OpenSSH (and paramiko's SSHClient) look up in known_hosts."""
    return address if port == 22 else f"[{address}]:{port}"


def hash_known_host(name: str, salt: bytes | None = None) -> str:
    """OpenSSH ``HashKnownHosts`` form: ``|1|base64(salt)|base64(HMAC-SHA1(salt, name))``."""
    salt = os.urandom(20) if salt is None else salt
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


# ---------------------------------------------------------------------------
# one host
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class SshdHost:
    """One sshd listener acting as a fleet host."""

    name: str
    address: str
    port: int
    host_key_path: Path
    host_public_key: str
    workdir_root: Path
    config_path: Path
    log_path: Path
    pid_file: Path
    pid: int | None = None
    _cluster: "SshdCluster | None" = dataclasses.field(default=None, repr=False)
    _proc: subprocess.Popen | None = dataclasses.field(default=None, repr=False)
    _log_offset: int = dataclasses.field(default=0, repr=False)
    _frozen: bool = dataclasses.field(default=False, repr=False)
    # session processes left running by stop(kill_sessions=False)
    _detached: list = dataclasses.field(default_factory=list, repr=False)

    # -- info ---------------------------------------------------------------

    @property
    def known_hosts_name(self) -> str:
        return known_hosts_name(self.address, self.port)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def frozen(self) -> bool:
        return self._frozen

    def connect_kwargs(self) -> dict:
        """Keyword arguments for ``paramiko.SSHClient.connect``."""
        c = self._cluster
        return dict(
            hostname=self.address,
            port=self.port,
            username=c.user if c else None,
            key_filename=str(c.client_key_path) if c else None,
            allow_agent=False,
            look_for_keys=False,
        )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def session_pids(self) -> list[int]:
        """Live per-connection processes (sshd children and the user's commands
        under them) of the current listener, plus any left by
        ``stop(kill_sessions=False)``."""
        pids = []
        if self.pid is not None and _ProcRef.of(self.pid) is not None:
            for pid in _descendants(self.pid):
                ref = _ProcRef.of(pid)
                if ref is not None and ref.alive():
                    pids.append(pid)
        pids += [r.pid for r in self._detached if r.alive() and r.pid not in pids]
        return pids

    # -- lifecycle ----------------------------------------------------------

    def _launch(self, sshd: str) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sshd, "-D", "-f", str(self.config_path), "-E", str(self.log_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # own session: a Ctrl-C in the terminal reaches pytest, whose
                # teardown stops us, not the daemons directly
                start_new_session=True,
                close_fds=True,
            )
        self.pid = self._proc.pid
        self._frozen = False

    def _poll_ready(self) -> str:
        """'ready', 'starting', 'port-in-use' or 'failed'."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                new = f.read().decode(errors="replace")
        except FileNotFoundError:
            new = ""
        for m in _LISTEN_RE.finditer(new):
            if m.group(1) == self.address and int(m.group(2)) == self.port:
                return "ready" if self._proc.poll() is None else "failed"
        if self._proc.poll() is not None:
            self._proc.wait()
            self.pid = None
            return "port-in-use" if "Address already in use" in new else "failed"
        return "starting"

    def _log_tail(self, lines: int = 15) -> str:
        text = self.log_text()[self._log_offset :]
        return "\n".join(text.strip().splitlines()[-lines:])

    def start(self, timeout: float = 10.0) -> None:
        """Start again on the same port with the same host key."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        sshd = self._cluster.sshd if self._cluster else find_sshd()
        if self._cluster is not None:
            _LIVE_CLUSTERS.add(self._cluster)  # atexit safety net
        self._launch(sshd)
        state = "starting"
        deadline = time.monotonic() + timeout
        interval = 0.002
        while time.monotonic() < deadline:
            state = self._poll_ready()
            if state != "starting":
                break
            time.sleep(interval)
            interval = min(interval * 1.5, 0.05)
        if state == "ready":
            return
        if state == "starting":
            self._kill_tree()
        raise SshdStartError(f"{self.name}: sshd on {self.address}:{self.port} did not start ({state}):\n{self._log_tail()}")

    def _stop_tree(self) -> list[_ProcRef]:
        """SIGSTOP the listener and then, repeatedly, every descendant until the
        tree is stable (a stopped process cannot fork).  Returns descendants."""
        if self.pid is None:
            return []
        root = _ProcRef.of(self.pid)
        if root is None:
            return []
        root.signal(signal.SIGSTOP)
        _wait_until(lambda: root.state() in (None, "T", "t", "Z", "X"), 2.0)
        seen: dict[int, _ProcRef] = {}
        for _ in range(100):
            new = []
            for pid in _descendants(self.pid):
                if pid not in seen:
                    ref = _ProcRef.of(pid)
                    if ref is not None:
                        seen[pid] = ref
                        new.append(ref)
            if not new:
                break
            for ref in new:
                ref.signal(signal.SIGSTOP)
            _wait_until(lambda: all(r.state() in (None, "T", "t", "Z", "X") for r in new), 2.0)
        return list(seen.values())

    def freeze(self) -> None:
        """SIGSTOP the listener and all its per-connection processes (sshd
        children and the user's commands still attached to a session): new
        connections get a TCP connect (kernel backlog) but never a banner, and
        open connections stop answering.  The kernel still ACKs, so TCP
        keepalives do not notice.  Processes that detached from their session
        (setsid/double fork, reparented to init) keep running: this simulates
        a hung sshd / hung connections, not a whole frozen machine."""
        if not self.running:
            raise RuntimeError(f"{self.name} is not running")
        self._stop_tree()
        for r in self._detached:
            r.signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """SIGCONT everything freeze() stopped (and anything forked since)."""
        if self.pid is not None:
            ref = _ProcRef.of(self.pid)
            if ref is not None:
                for pid in _descendants(self.pid):
                    r = _ProcRef.of(pid)
                    if r is not None:
                        r.signal(signal.SIGCONT)
                ref.signal(signal.SIGCONT)
        for r in self._detached:
            r.signal(signal.SIGCONT)
        self._frozen = False

    def _kill_tree(self, kill_sessions: bool = True, timeout: float = 10.0) -> None:
        descendants = self._stop_tree()
        root = _ProcRef.of(self.pid) if self.pid is not None else None
        victims = [r for r in [root] if r is not None]
        if kill_sessions:
            victims += descendants + self._detached
            self._detached = []
        else:
            self._detached += descendants
        for r in victims:
            r.signal(signal.SIGKILL)
        if not kill_sessions:
            for r in descendants:
                r.signal(signal.SIGCONT)
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        gone = _wait_until(lambda: not any(r.alive() for r in victims), timeout)
        self._proc = None
        self.pid = None
        self._frozen = False
        if not gone:
            left = [r.pid for r in victims if r.alive()]
            raise RuntimeError(f"{self.name}: processes still alive after SIGKILL: {left}")

    def stop(self, kill_sessions: bool = True, timeout: float = 10.0) -> None:
        """Kill the listener (SIGKILL, so a frozen host stops too) and, unless
        ``kill_sessions=False``, every per-connection process under it; wait
        until they are gone.  With ``kill_sessions=False`` open connections
        survive, like ``systemctl restart ssh``; they are killed later by
        ``stop()``/``stop_all()``."""
        if self._proc is None and not (kill_sessions and self._detached):
            return
        self._kill_tree(kill_sessions=kill_sessions, timeout=timeout)

    def regenerate_host_key(self, restart: bool = True) -> str:
        """New host key (for 'changed host key' tests), restarting the daemon if
        it was running.  known_hosts is NOT updated: clients now see a mismatch.
        ``cluster.write_known_hosts()`` accepts the new key.  Returns the new
        public key line."""
        was_running = self.running
        if was_running:
            self.stop()
        keygen = self._cluster.keygen if self._cluster else find_ssh_keygen()
        _keygen_many(keygen, [self.host_key_path], f"{self.name}-hostkey")
        self.host_public_key = _public_key_line(self.host_key_path)
        if was_running and restart:
            self.start()
        return self.host_public_key


# ---------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------

_LIVE_CLUSTERS: "weakref.WeakSet[SshdCluster]" = weakref.WeakSet()


@atexit.register
def _stop_leftover_clusters() -> None:
    for c in list(_LIVE_CLUSTERS):
        try:
            c.stop_all()
        except Exception:  # noqa: BLE001
            pass


class SshdCluster:
    """Several sshd "hosts" on loopback sharing one client key, one ssh_config
    and one known_hosts.

    ``SshdCluster(base_dir, ...).start(n)``; calling ``start(k)`` again adds k
    more hosts.  Usable as a context manager (``stop_all()`` on exit).

    Options:
      user               login user (default: ``qltest`` as root, else the
                         current user; as non-root only the current user works)
      distinct_addresses host i listens on 127.0.0.(i+2) instead of 127.0.0.1
      hashed_known_hosts write hashed ``|1|...`` names in known_hosts
      login_path         ``SetEnv PATH=...`` for sessions (default: sshd's)
      extra_sshd_config  extra lines appended to every sshd_config
      name_format        host names, default ``host-{:02d}`` (1-based)
      sftp               offer the sftp subsystem (hardened configurations leave it out)
    """

    def __init__(
        self,
        base_dir: str | os.PathLike,
        *,
        user: str | None = None,
        distinct_addresses: bool = False,
        hashed_known_hosts: bool = False,
        login_path: str | None = None,
        extra_sshd_config: Iterable[str] = (),
        name_format: str = "host-{:02d}",
        sftp: bool = True,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.distinct_addresses = distinct_addresses
        self.hashed_known_hosts = hashed_known_hosts
        self.login_path = login_path
        self.extra_sshd_config = list(extra_sshd_config)
        self.name_format = name_format
        self.sftp = sftp
        self.hosts: list[SshdHost] = []
        self.sshd = find_sshd()
        self.keygen = find_ssh_keygen()
        self.as_root = _is_root()
        if user is None:
            user = DEFAULT_LOGIN_USER if self.as_root else pwd.getpwuid(os.getuid()).pw_name
        elif not self.as_root and user != pwd.getpwuid(os.getuid()).pw_name:
            raise ValueError("an unprivileged sshd can only log in the user running it")
        self.user = user
        self.client_key_path = self.base_dir / "client_key"
        self.client_public_key = ""
        self.ssh_config_path = self.base_dir / "ssh_config"
        self.known_hosts_path = self.base_dir / "known_hosts"
        self.shared_dir: Path | None = None  # dir the login user can reach
        self.authorized_keys_path: Path | None = None
        self._own_shared_dir = False
        self._setup_done = False
        self._stopped = False

    # -- context manager -------------------------------------------------------

    def __enter__(self) -> "SshdCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    # -- lookups ---------------------------------------------------------------

    def host(self, name: str) -> SshdHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def __iter__(self):
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    @property
    def login_pw(self) -> pwd.struct_passwd:
        return pwd.getpwnam(self.user)

    # -- setup -----------------------------------------------------------------

    def _setup(self) -> None:
        if self._setup_done:
            return
        if not self.sshd:
            raise SshdStartError("sshd not found")
        if not self.keygen:
            raise SshdStartError("ssh-keygen not found")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            _ensure_privsep_dir()
            pw = ensure_login_user(self.user) if self.user == DEFAULT_LOGIN_USER else pwd.getpwnam(self.user)
        else:
            pw = pwd.getpwnam(self.user)
        shared = self.base_dir / "shared"
        if self.as_root and pw.pw_uid != 0 and not _searchable_by(self.base_dir, pw):
            tmp = tempfile.gettempdir()
            if not _searchable_by(Path(tmp), pw):
                tmp = "/tmp"
            shared = Path(tempfile.mkdtemp(prefix="quantlab-sshd-", dir=tmp))
            self._own_shared_dir = True
        shared.mkdir(parents=True, exist_ok=True)
        os.chmod(shared, 0o755)
        self.shared_dir = shared
        # client key: read by this process only; authorized_keys: read by sshd
        # *as the login user*, hence world-readable in the shared dir
        _keygen_many(self.keygen, [self.client_key_path], "quantlab-test-client")
        self.client_public_key = _public_key_line(self.client_key_path)
        self.authorized_keys_path = shared / "authorized_keys"
        _atomic_write(self.authorized_keys_path, self.client_public_key + " quantlab-test-client\n", 0o644)
        _LIVE_CLUSTERS.add(self)
        self._setup_done = True

    def chown_to_user(self, path: str | os.PathLike, recursive: bool = True) -> None:
        """Give a path (written by this process) to the login user."""
        if not self.as_root:
            return
        pw = self.login_pw
        paths = [Path(path)]
        if recursive and Path(path).is_dir():
            paths += list(Path(path).rglob("*"))
        for p in paths:
            os.lchown(p, pw.pw_uid, pw.pw_gid)

    def _sshd_config(self, h: SshdHost) -> str:
        root_login = "prohibit-password" if self.user == "root" else "no"
        lines = [
            f"# quantlab test host {h.name}",
            f"Port {h.port}",
            f"ListenAddress {h.address}",
            "AddressFamily inet",
            f"HostKey {h.host_key_path}",
            f"PidFile {h.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys_path}",
            f"AllowUsers {self.user}",
            f"PermitRootLogin {root_login}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "PermitEmptyPasswords no",
            "StrictModes no",
            "UsePAM no",
            "UseDNS no",
            "MaxStartups 200",
            "MaxSessions 100",
            "MaxAuthTries 10",
            "LoginGraceTime 60",
            "LogLevel VERBOSE",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowAgentForwarding no",
            "AllowTcpForwarding yes",
            "PermitTunnel no",
            "ClientAliveInterval 0",
        ]
        if self.sftp:
            lines.append("Subsystem sftp internal-sftp")
        if sshd_version(self.sshd) >= (9, 8):
            # sshd >= 9.8 penalises sources that fail/abort often: our
            # refused/timeout tests all come from 127.0.0.1
            lines.append("PerSourcePenalties no")
        if self.login_path:
            lines.append(f"SetEnv PATH={self.login_path}")
        lines += self.extra_sshd_config
        return "\n".join(lines) + "\n"

    def _write_host_config(self, h: SshdHost) -> None:
        _atomic_write(h.config_path, self._sshd_config(h), 0o644)

    def write_known_hosts(self) -> None:
        """(Re)write known_hosts from the hosts' current keys and ports."""
        lines = []
        for h in self.hosts:
            name = h.known_hosts_name
            if self.hashed_known_hosts:
                name = hash_known_host(name)
            lines.append(f"{name} {h.host_public_key}\n")
        _atomic_write(self.known_hosts_path, "".join(lines), 0o644)

    def write_ssh_config(self) -> None:
        """(Re)write the OpenSSH client config (``ssh -F ssh_config host-01``)."""
        blocks = []
        for h in self.hosts:
            blocks.append(
                "\n".join(
                    [
                        f"Host {h.name}",
                        f"    HostName {h.address}",
                        f"    Port {h.port}",
                        f"    User {self.user}",
                        f"    IdentityFile {self.client_key_path}",
                        "    IdentitiesOnly yes",
                        f"    UserKnownHostsFile {self.known_hosts_path}",
                        "    GlobalKnownHostsFile /dev/null",
                        "    StrictHostKeyChecking yes",
                        "    BatchMode yes",
                        "    ConnectTimeout 5",
                    ]
                )
            )
        _atomic_write(self.ssh_config_path, "\n\n".join(blocks) + "\n", 0o644)

    # -- start / stop ------------------------------------------------------------

    def start(self, n: int, timeout: float | None = None) -> "SshdCluster":
        """Start ``n`` more hosts: all daemons are launched first, then waited
        for together (readiness = "Server listening on ADDR port PORT" in the
        host's log while the process is alive).  A port lost to a race is
        replaced by another free port (up to 5 times per host)."""
        if self._stopped:
            raise RuntimeError("cluster was stopped")
        self._setup()
        timeout = 10.0 + 0.25 * n if timeout is None else timeout
        deadline = time.monotonic() + timeout
        first = len(self.hosts) + 1
        pw = self.login_pw
        new_hosts: list[SshdHost] = []
        for i in range(first, first + n):
            name = self.name_format.format(i)
            hdir = self.base_dir / name
            hdir.mkdir(parents=True, exist_ok=True)
            address = f"127.0.0.{i + 1}" if self.distinct_addresses else "127.0.0.1"
            if self.distinct_addresses and i + 1 > 254:
                raise ValueError("distinct_addresses supports at most 253 hosts")
            workdir_root = self.shared_dir / name / "workdirs"
            workdir_root.mkdir(parents=True, exist_ok=True)
            for d in (workdir_root.parent, workdir_root):
                os.chmod(d, 0o755)
                if self.as_root:
                    os.chown(d, pw.pw_uid, pw.pw_gid)
            new_hosts.append(
                SshdHost(
                    name=name,
                    address=address,
                    port=0,
                    host_key_path=hdir / "ssh_host_ed25519_key",
                    host_public_key="",
                    workdir_root=workdir_root,
                    config_path=hdir / "sshd_config",
                    log_path=hdir / "sshd.log",
                    pid_file=hdir / "sshd.pid",
                    _cluster=self,
                )
            )
        # registered before launching so stop_all() covers a failed start
        self.hosts.extend(new_hosts)
        _keygen_many(self.keygen, [h.host_key_path for h in new_hosts], "quantlab-test-host")
        for h in new_hosts:
            h.host_public_key = _public_key_line(h.host_key_path)
        ports = _pick_free_ports([h.address for h in new_hosts])
        for h, port in zip(new_hosts, ports):
            h.port = port
            self._write_host_config(h)
            h._launch(self.sshd)
        pending = list(new_hosts)
        retries = {h.name: 0 for h in new_hosts}
        interval = 0.002
        while pending:
            still = []
            for h in pending:
                state = h._poll_ready()
                if state == "ready":
                    continue
                if state == "port-in-use" and retries[h.name] < 5:
                    retries[h.name] += 1
                    h.port = _pick_free_ports([h.address])[0]
                    self._write_host_config(h)
                    h._launch(self.sshd)
                    still.append(h)
                elif state == "starting":
                    still.append(h)
                else:
                    raise SshdStartError(
                        f"{h.name}: sshd on {h.address}:{h.port} failed to start ({state}):\n{h._log_tail()}"
                    )
            pending = still
            if not pending:
                break
            if time.monotonic() > deadline:
                names = ", ".join(h.name for h in pending)
                raise SshdStartError(f"sshd did not start within {timeout:.1f}s: {names}\n{pending[0]._log_tail()}")
            time.sleep(interval)
            interval = min(interval * 1.5, 0.05)
        self.write_known_hosts()
        self.write_ssh_config()
        return self

    def all_pids(self) -> list[int]:
        """Listener pids plus all session pids (for leak checks)."""
        out = []
        for h in self.hosts:
            if h.pid is not None:
                out.append(h.pid)
            out += h.session_pids()
        return out

    def stop_all(self, timeout: float = 10.0) -> None:
        """Kill every listener and its sessions (by pid), wait for them to be
        gone, remove the out-of-tree shared dir (authorized_keys, workdir
        roots) if one was made.  Final: the cluster cannot start again.  Safe
        to call twice."""
        errors = []
        for h in self.hosts:
            try:
                h.stop(kill_sessions=True, timeout=timeout)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        self._stopped = True
        _LIVE_CLUSTERS.discard(self)
        if self._own_shared_dir and self.shared_dir is not None:
            shutil.rmtree(self.shared_dir, ignore_errors=True)
            self._own_shared_dir = False
        if errors:
            raise errors[0]


def start_cluster(n: int, base_dir: str | os.PathLike, **kwargs) -> SshdCluster:
    """``SshdCluster(base_dir, **kwargs).start(n)``, stopping it if start fails."""
    cluster = SshdCluster(base_dir, **kwargs)
    try:
        return cluster.start(n)
    except BaseException:
        cluster.stop_all()
        raise
