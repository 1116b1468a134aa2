"""The `ssh` transport: one paramiko connection per host, kept open across commands and ticks.

OpenSSH conventions: ssh_config (HostName, User, Port, IdentityFile, IdentitiesOnly, ProxyJump,
ConnectTimeout, UserKnownHostsFile), keys from the agent and the default identity files, and host
keys checked against known_hosts. An unknown key is refused with its fingerprint and the command
that trusts it; a changed key is refused loudly and never accepted. The whole handshake is bounded
by the connect timeout, each command by the command timeout, so a dead or frozen host costs at most
those and never stalls the others.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import os
import select
import shlex
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import paramiko

from quantlab.core.spec import SshSettings
from .base import Completed, TransportError

KEEPALIVE_S = 15

# Writes stdin to $1 atomically with mode $2, creating its folders (0700, like the sftp path does):
# the upload for hosts whose sshd offers no sftp subsystem.
_PUT_SCRIPT = (
    'set -e; umask 077; dir=$(dirname -- "$1"); mkdir -p -- "$dir"; '
    'tmp="$dir/.$(basename -- "$1").tmp-$$"; trap \'rm -f -- "$tmp"\' EXIT; '
    'cat > "$tmp"; chmod "$2" "$tmp"; mv -f -- "$tmp" "$1"'
)

# paramiko's transport threads log (and print tracebacks for) every failed handshake; our errors say
# what failed already, so keep its records out of the user's terminal unless logging is configured.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


@dataclass(frozen=True)
class Endpoint:
    """Where an ssh_config alias really points, with the worker's user/port taking precedence."""

    alias: str
    hostname: str
    port: int
    user: str | None
    identity_files: tuple[str, ...]
    identities_only: bool
    proxy_jump: str | None
    connect_timeout: float
    known_hosts: tuple[str, ...]

    @property
    def known_hosts_name(self) -> str:
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def __str__(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"{who}{self.alias}" + (f":{self.port}" if self.port != 22 else "")


_SSH_CONFIGS: dict[str, tuple[Any, paramiko.SSHConfig]] = {}
_LOOKUPS: "weakref.WeakKeyDictionary[paramiko.SSHConfig, dict[str, Any]]" = weakref.WeakKeyDictionary()
_CONFIG_LOCK = threading.Lock()


def load_ssh_config(path: str) -> paramiko.SSHConfig:
    """The ssh_config file, parsed once for as long as it is unchanged (inode, size, mtime) and shared
    by every host: a file naming N hosts parsed for each of them is N² lines for a cold round."""
    expanded = os.path.expanduser(path)
    try:
        st = os.stat(expanded)
    except FileNotFoundError:
        return paramiko.SSHConfig()
    signature = (st.st_ino, st.st_size, st.st_mtime_ns)
    with _CONFIG_LOCK:
        cached = _SSH_CONFIGS.get(expanded)
    if cached is not None and cached[0] == signature:
        return cached[1]
    config = paramiko.SSHConfig.from_path(expanded)
    with _CONFIG_LOCK:
        _SSH_CONFIGS[expanded] = (signature, config)
    return config


def lookup(config: paramiko.SSHConfig, alias: str) -> dict[str, Any]:
    """A host's settings, looked up once per parsed file (each lookup matches every Host pattern)."""
    with _CONFIG_LOCK:
        found = _LOOKUPS.setdefault(config, {}).get(alias)
    if found is None:
        found = dict(config.lookup(alias))
        with _CONFIG_LOCK:
            _LOOKUPS.setdefault(config, {})[alias] = found
    return found


def resolve(alias: str, port: int | None, user: str | None, settings: SshSettings,
            config: paramiko.SSHConfig | None = None) -> Endpoint:
    config = config or load_ssh_config(settings.config)
    found = lookup(config, alias)
    timeout = settings.connect_timeout_s
    if "connecttimeout" in found:
        # A host's own ConnectTimeout may only shorten the fleet's bound.
        timeout = min(timeout, float(found["connecttimeout"]))
    known = [os.path.expanduser(settings.known_hosts)]
    for extra in found.get("userknownhostsfile", "").split():
        if os.path.expanduser(extra) not in known:
            known.append(os.path.expanduser(extra))
    return Endpoint(
        alias=alias,
        hostname=found.get("hostname", alias),
        port=int(port or found.get("port", 22)),
        user=user or found.get("user"),
        identity_files=tuple(os.path.expanduser(p) for p in found.get("identityfile", [])),
        identities_only=str(found.get("identitiesonly", "no")).lower() == "yes",
        proxy_jump=found.get("proxyjump") if str(found.get("proxyjump", "none")).lower() != "none" else None,
        connect_timeout=timeout,
        known_hosts=tuple(known),
    )


def wait_readable(channel: paramiko.Channel, timeout: float | None) -> None:
    """Until the channel has data, has ended or closed, or `timeout` seconds pass. poll, not select:
    select refuses descriptors past 1023, and a controller holding hundreds of hosts has more."""
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    poller.poll(None if timeout is None else max(0, int(timeout * 1000)))


def _seconds(value: float) -> str:
    """A time budget for people: what is left of a deadline is 1.997 s, but the deadline said 2."""
    return f"{round(value, 1):g}"


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class KnownHostsUnreadable(Exception):
    def __init__(self, path: str, reason: Exception):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


_KNOWN_HOSTS: dict[tuple[str, ...], tuple[tuple[Any, ...], paramiko.HostKeys]] = {}
_KNOWN_HOSTS_LOCK = threading.Lock()


def known_hosts(paths: tuple[str, ...]) -> paramiko.HostKeys:
    """The known_hosts files, parsed once for as long as they are unchanged (inode, size, mtime) and
    shared by every connection, which only looks keys up in them: each connection parsing the whole
    file made a cold round over N hosts cost N² lines parsed (12 ms of a 21 ms handshake at 250)."""
    signature: list[Any] = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            signature.append(None)
            continue
        except OSError as exc:
            raise KnownHostsUnreadable(path, exc) from None
        signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
    with _KNOWN_HOSTS_LOCK:
        cached = _KNOWN_HOSTS.get(paths)
    if cached is not None and cached[0] == tuple(signature):
        return cached[1]
    keys = paramiko.HostKeys()
    for path, seen in zip(paths, signature):
        if seen is not None:
            try:
                keys.load(path)
            except (OSError, paramiko.SSHException) as exc:
                raise KnownHostsUnreadable(path, exc) from None
    with _KNOWN_HOSTS_LOCK:
        _KNOWN_HOSTS[paths] = (tuple(signature), keys)
    return keys


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Unknown host keys: refused, or with accept_new recorded (OpenSSH StrictHostKeyChecking=accept-new)."""

    def __init__(self, endpoint: Endpoint, accept_new: bool, write_to: str):
        self.endpoint, self.accept_new, self.write_to = endpoint, accept_new, write_to
        self.refused: str | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        name = self.endpoint.known_hosts_name
        if not self.accept_new:
            port = f"-p {self.endpoint.port} " if self.endpoint.port != 22 else ""
            self.refused = (f"unknown host key for {name} ({key.get_name()} {fingerprint(key)}); verify it, then "
                            f"trust it with `ssh-keyscan {port}{self.endpoint.hostname} >> {self.write_to}` "
                            "or run once with --accept-new-host-keys")
            raise paramiko.SSHException(self.refused)
        folder = os.path.dirname(self.write_to)
        if folder:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        with open(self.write_to, "a") as handle:
            handle.write(f"{name} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(name, key.get_name(), key)


class _QuietTransport(paramiko.Transport):
    """paramiko's Transport, its thread waking once a second instead of ten times while the
    connection is idle. It polls the socket with this timeout only to notice a close, a keepalive
    that is due or a rekey it asked for; data wakes it at once, and every wait of ours has its own
    deadline. A kept connection to each of hundreds of hosts then costs a tenth of the CPU idle."""

    _active_check_timeout = 1.0


class SshTransport:
    """One host over SSH. Thread-safe: commands share one connection, each on its own channel."""

    def __init__(self, endpoint: Endpoint, settings: SshSettings, accept_new_host_keys: bool = False,
                 config: paramiko.SSHConfig | None = None, handshakes: threading.Semaphore | None = None):
        self.endpoint = endpoint
        self.settings = settings
        self.accept_new = accept_new_host_keys
        self.config = config
        self.handshakes = handshakes
        self.name = str(endpoint)
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_missing = False          # the server refused the sftp subsystem once: use commands
        self._jump: SshTransport | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_host(cls, alias: str, port: int | None, user: str | None, settings: SshSettings,
                 accept_new_host_keys: bool = False,
                 handshakes: threading.Semaphore | None = None) -> "SshTransport":
        try:
            config = load_ssh_config(settings.config)
            endpoint = resolve(alias, port, user, settings, config)
        except (OSError, ValueError, paramiko.SSHException, paramiko.config.ConfigParseError) as exc:
            raise TransportError(alias, f"cannot use ssh_config {settings.config}: {exc}; fix that "
                                                  "file or the Fleet's ssh.config") from None
        return cls(endpoint, settings, accept_new_host_keys, config, handshakes)

    # --- connection ----------------------------------------------------------------------------

    def _error(self, message: str) -> TransportError:
        return TransportError(self.name, message)

    def _connected(self) -> paramiko.SSHClient:
        with self._lock:
            client = self._client
            if client is not None:
                transport = client.get_transport()
                if transport is not None and transport.is_active():
                    return client
                self._drop()
            self._client = self._connect()
            return self._client

    def _open_socket(self, deadline: float) -> Any:
        ep = self.endpoint
        if ep.proxy_jump:
            if self._jump is None:
                # "a,b": the target is reached through b, and b through a (like OpenSSH).
                *before, last = [hop.strip() for hop in ep.proxy_jump.split(",")]
                jump_user, _, jump_host = last.rpartition("@")
                jump_host, _, jump_port = jump_host.partition(":")
                hop = resolve(jump_host, int(jump_port) if jump_port else None, jump_user or None,
                              self.settings, self.config)
                if before:
                    hop = dataclasses.replace(hop, proxy_jump=",".join(before))
                # Not throttled: this handshake runs while ours holds a slot, and waiting for a second
                # slot could deadlock once every slot is held that way.
                self._jump = SshTransport(hop, self.settings, self.accept_new, self.config)
            jump = self._jump._connected().get_transport()
            assert jump is not None
            try:
                return jump.open_channel("direct-tcpip", (ep.hostname, ep.port), ("127.0.0.1", 0),
                                         timeout=max(0.1, deadline - time.monotonic()))
            except (paramiko.SSHException, OSError) as exc:
                raise self._error(f"jump host {self._jump.name} could not reach "
                                             f"{ep.hostname}:{ep.port}: {exc}") from None
        try:
            return socket.create_connection((ep.hostname, ep.port), timeout=max(0.1, deadline - time.monotonic()))
        except socket.gaierror as exc:
            raise self._error(f"cannot resolve {ep.hostname} ({exc.strerror}); check the worker's host "
                                     "or HostName in ssh_config") from None
        except ConnectionRefusedError:
            raise self._error(f"connection refused on {ep.hostname}:{ep.port}; is sshd running "
                                         "there, on that port?") from None
        except (socket.timeout, TimeoutError):
            raise self._error(f"no TCP answer from {ep.hostname}:{ep.port} within "
                                                 f"{ep.connect_timeout:g}s; is the host up and reachable?") from None
        except OSError as exc:
            raise self._error(f"cannot connect to {ep.hostname}:{ep.port}: {exc.strerror}") from None

    def _connect(self) -> paramiko.SSHClient:
        """TCP, banner, key exchange and authentication, all within the connect timeout (which starts
        once a handshake slot is free: waiting for one is waiting for other hosts, not this one)."""
        if self.handshakes is None:
            return self._handshake()
        with self.handshakes:
            return self._handshake()

    def _handshake(self) -> paramiko.SSHClient:
        ep = self.endpoint
        deadline = time.monotonic() + ep.connect_timeout
        sock = self._open_socket(deadline)
        client = paramiko.SSHClient()
        try:
            client._system_host_keys = known_hosts(ep.known_hosts)     # what load_system_host_keys fills
        except KnownHostsUnreadable as exc:
            sock.close()
            raise self._error(f"cannot read known_hosts {exc.path}: {exc.reason}") from None
        policy = _HostKeyPolicy(ep, self.accept_new, ep.known_hosts[0])
        client.set_missing_host_key_policy(policy)
        # A watchdog closes everything when the deadline passes, so no handshake step can hang.
        expired = threading.Event()

        def give_up() -> None:
            expired.set()
            try:
                sock.close()
            finally:
                transport = client.get_transport()
                if transport is not None:
                    transport.close()
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), give_up)
        watchdog.daemon = True
        watchdog.start()
        left = max(0.1, deadline - time.monotonic())
        try:
            client.connect(
                ep.hostname, ep.port, username=ep.user, sock=sock, timeout=left, banner_timeout=left,
                auth_timeout=left, channel_timeout=left, transport_factory=_QuietTransport,
                key_filename=[p for p in ep.identity_files if os.path.exists(p)] or None,
                allow_agent=not ep.identities_only, look_for_keys=not ep.identities_only,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise self._error((
                f"HOST KEY CHANGED for {ep.known_hosts_name}: it now offers {exc.key.get_name()} "
                f"{fingerprint(exc.key)}, known_hosts has {fingerprint(exc.expected_key)}. This may be an attack; "
                f"refusing to connect. If the change is expected, remove the old key with "
                f"`ssh-keygen -R '{ep.known_hosts_name}' -f {ep.known_hosts[0]}` and trust the new one")) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise self._error(f"authentication failed for user {ep.user or '(default)'} ({exc}); check "
                                      "IdentityFile in ssh_config, ssh-agent, and the host's authorized_keys") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            if policy.refused:
                raise self._error(policy.refused) from None
            if expired.is_set():
                raise self._error(f"no SSH handshake with {ep.hostname}:{ep.port} within "
                                                     f"{ep.connect_timeout:g}s (banner, key exchange or "
                                                     "authentication hung); is sshd there healthy?") from None
            raise self._error(f"SSH connection failed: {exc}") from None
        finally:
            watchdog.cancel()
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(KEEPALIVE_S)
        return client

    def _drop(self) -> None:
        client, self._client, self._sftp = self._client, None, None
        if client is not None:
            try:
                client.close()
            except (OSError, paramiko.SSHException, EOFError):
                pass

    def _channel(self, deadline: float) -> paramiko.Channel:
        """A session channel; a connection found dropped is re-made once, transparently."""
        budget = max(0.0, deadline - time.monotonic())
        for attempt in (1, 2):
            client = self._connected()
            transport = client.get_transport()
            try:
                assert transport is not None
                return transport.open_session(timeout=max(0.1, deadline - time.monotonic()))
            except (paramiko.SSHException, EOFError, OSError, AssertionError) as exc:
                with self._lock:
                    if self._client is client:
                        self._drop()
                if attempt == 2 or time.monotonic() >= deadline:
                    if "Timeout" in str(exc) or time.monotonic() >= deadline:
                        raise self._error(f"no session opened within {_seconds(budget)}s ({exc}); the "
                                                     "host may be overloaded or frozen") from None
                    raise self._error(f"cannot open a session: {exc or type(exc).__name__}") from None
        raise AssertionError("unreachable")

    # --- the Transport interface ---------------------------------------------------------------

    def run(self, argv: list[str], stdin: bytes = b"", timeout: float = 30.0) -> Completed:
        deadline = time.monotonic() + timeout
        channel = self._channel(deadline)
        try:
            self._start(channel, argv, stdin, deadline, timeout)
            out, err = bytearray(), bytearray()
            while True:
                while channel.recv_ready():
                    out += channel.recv(65536)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abandon(channel)
                    raise self._timed_out(argv, timeout)
                wait_readable(channel, min(left, 1.0))
            return Completed(channel.recv_exit_status(), bytes(out), bytes(err))
        except TransportError as exc:
            exc.maybe_ran = True                   # the exec request went out: it may run there
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self._abandon(channel)
            raise TransportError(self.name, f"connection lost during {argv[0]}: {exc}", maybe_ran=True) from None
        finally:
            channel.close()

    def _timed_out(self, argv: list[str], timeout: float) -> TransportError:
        return self._error(f"{argv[0]} {argv[2] if len(argv) > 2 else ''} did not finish "
                                      f"within {_seconds(timeout)}s; the host may be overloaded or frozen")

    def _start(self, channel: paramiko.Channel, argv: list[str], stdin: bytes, deadline: float,
               timeout: float, close_stdin: bool = True) -> None:
        """Send the command and its stdin, by the deadline. paramiko waits for the server's answer to
        an exec request without any timeout, and sendall waits for window space: a host that stops
        answering right after the channel opened would hang here for ever. A watchdog closes the
        connection at the deadline, which wakes both."""
        expired = threading.Event()
        transport = channel.get_transport()

        def give_up() -> None:
            expired.set()
            if transport is not None:
                transport.close()
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), give_up)
        watchdog.daemon = True
        watchdog.start()
        try:
            channel.settimeout(max(0.1, deadline - time.monotonic()))
            channel.exec_command(shlex.join(argv))     # each word quoted: nothing is parsed by the shell
            try:
                if stdin:
                    channel.sendall(stdin)
                if close_stdin:
                    channel.shutdown_write()
            except OSError:
                # A command that ended before it read its input (an agent not uploaded yet: python3
                # cannot open the file) closes the channel under us: its exit status says why.
                if not channel.exit_status_ready():
                    raise
        except (paramiko.SSHException, OSError, EOFError):
            if expired.is_set() or time.monotonic() >= deadline:
                self._abandon(channel)
                raise self._timed_out(argv, timeout) from None
            raise
        finally:
            watchdog.cancel()
        if expired.is_set():
            self._abandon(channel)
            raise self._timed_out(argv, timeout)

    def _abandon(self, channel: paramiko.Channel) -> None:
        # A command that hangs means the connection cannot be trusted: the next call makes a new one.
        channel.close()
        with self._lock:
            self._drop()

    def open(self, argv: list[str], deadline: float) -> "SshPipe":
        channel = self._channel(deadline)
        try:
            self._start(channel, argv, b"", deadline, max(0.1, deadline - time.monotonic()), close_stdin=False)
        except TransportError:
            channel.close()
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self._abandon(channel)
            raise TransportError(self.name, f"connection lost while starting {argv[0]}: {exc}") from None
        return SshPipe(self, channel)

    def stream(self, argv: list[str], stdin: bytes = b"") -> Iterator[bytes]:
        timeout = self.settings.command_timeout_s
        deadline = time.monotonic() + timeout
        channel = self._channel(deadline)
        try:
            self._start(channel, argv, stdin, deadline, timeout)
            channel.settimeout(None)                   # then output may take as long as it takes (-f)
            while True:
                chunk = channel.recv(65536)
                if not chunk:
                    break
                yield chunk
        finally:
            channel.close()

    def _sftp_client(self) -> paramiko.SFTPClient:
        client = self._connected()
        with self._lock:
            if self._sftp is None:
                # Like exec, the sftp subsystem request waits for the server without a timeout.
                transport = client.get_transport()
                watchdog = threading.Timer(self.settings.command_timeout_s,
                                           transport.close if transport is not None else (lambda: None))
                watchdog.daemon = True
                watchdog.start()
                try:
                    self._sftp = client.open_sftp()
                finally:
                    watchdog.cancel()
                channel = self._sftp.get_channel()
                if channel is not None:
                    channel.settimeout(self.settings.command_timeout_s)
            return self._sftp

    def put_file(self, data: bytes, path: str, mode: int = 0o644) -> None:
        if self._sftp_missing:
            self._put_by_command(data, path, mode)
            return
        try:
            sftp = self._sftp_client()
        except (paramiko.SSHException, EOFError) as exc:
            transport = self._client.get_transport() if self._client is not None else None
            if transport is None or not transport.is_active():
                with self._lock:
                    self._drop()
                raise self._error(f"upload of {path} failed: {exc}") from None
            # The connection is fine but the server refused the sftp subsystem (hardened sshd
            # configurations leave it out): send files over the command channel from now on.
            self._sftp_missing = True
            self._put_by_command(data, path, mode)
            return
        try:
            folder = os.path.dirname(path)
            self._makedirs(sftp, folder)
            tmp = f"{folder}/.{os.path.basename(path)}.tmp-{os.getpid()}" if folder else f".{path}.tmp-{os.getpid()}"
            with sftp.open(tmp, "wb") as handle:
                handle.write(data)
            sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, path)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            with self._lock:
                self._drop()
            raise self._error(f"upload of {path} failed: {exc}") from None

    def _put_by_command(self, data: bytes, path: str, mode: int) -> None:
        """The file as the stdin of a fixed sh script; the path and mode are its arguments, quoted
        word by word, so nothing of them is parsed by a shell."""
        argv = ["sh", "-c", _PUT_SCRIPT, "quantlab-put", path, format(mode, "o")]
        done = self.run(argv, stdin=data, timeout=self.settings.command_timeout_s)
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip() or f"exit code {done.returncode}"
            raise self._error(f"upload of {path} (without sftp) failed: {why}")

    @staticmethod
    def _makedirs(sftp: paramiko.SFTPClient, folder: str) -> None:
        if not folder:
            return
        parts = folder.split("/")
        for i in range(1, len(parts) + 1):
            partial = "/".join(parts[:i])
            if not partial:
                continue
            try:
                sftp.stat(partial)
            except FileNotFoundError:
                sftp.mkdir(partial, 0o700)

    def close(self) -> None:
        with self._lock:
            self._drop()
        if self._jump is not None:
            self._jump.close()


class SshPipe:
    """A command kept running on a host behind one channel of its transport's connection."""

    SEND_STEP_S = 1.0         # how long one send may wait for window space before the deadline is checked

    def __init__(self, transport: SshTransport, channel: paramiko.Channel):
        self.transport, self.channel = transport, channel
        channel.settimeout(self.SEND_STEP_S)

    def send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        try:
            while view:
                if time.monotonic() >= deadline:
                    raise TransportError(self.transport.name, "the agent took no more input within the deadline; "
                                                              "the host may be overloaded or frozen", maybe_ran=True)
                try:
                    view = view[self.channel.send(view[:32768]):]
                except socket.timeout:
                    continue                   # no window space yet: the host has not read what it has
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TransportError(self.transport.name, f"connection lost while sending to the agent: {exc}",
                                 maybe_ran=True) from None

    def recv(self) -> bytes:
        # Only the session's reader calls this. poll wakes on data, on the end and on a close, so
        # recv then never waits (the channel's timeout is there for send).
        while True:
            try:
                wait_readable(self.channel, None)
                if self.channel.recv_ready() or self.channel.closed or self.channel.eof_received:
                    return self.channel.recv(1 << 20)
            except socket.timeout:
                continue
            except (paramiko.SSHException, OSError, EOFError, ValueError):
                return b""

    ENDED_WAIT_S = 2.0        # the exit status may come a moment after the end of stdout

    def ended(self) -> Completed:
        err = bytearray()
        try:
            self.channel.status_event.wait(self.ENDED_WAIT_S)      # set by the exit status (or a close)
            while self.channel.recv_stderr_ready() and len(err) < 65536:
                err += self.channel.recv_stderr(65536)
            code = self.channel.recv_exit_status() if self.channel.exit_status_ready() else -1
        except (paramiko.SSHException, OSError, EOFError):
            code = -1
        return Completed(code, b"", bytes(err))

    def close(self) -> None:
        try:
            self.channel.shutdown_write()     # the agent's input ends: it finishes, then exits
        except (paramiko.SSHException, OSError, EOFError):
            pass
        self.channel.close()

    def abandon(self) -> None:
        self.transport._abandon(self.channel)
