"""A cluster: the three workers' addresses, this party's credentials for them, and (on one
machine) the worker processes themselves.

A ``Cluster`` is a description, cheap to make: the model owner starts it (``start()``, which
spawns the three workers and makes a throw-away CA for them), a client makes one with the same
addresses to connect. Every call to a worker goes over mutual TLS with a certificate of the
cluster's CA: on one machine, the throw-away CA's certificates, found by the addresses in a
private per-user directory; across hosts, the certificates named by a hosts file
(:meth:`Cluster.from_config`).
"""

import atexit
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref

from .errors import ClusterError, PortInUseError
from .log import say

JOB_NAME = "pk"
LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
LOCAL_ROLES = ("owner", "client")

_live_clusters = weakref.WeakSet()  # started here: stopped at exit


def local_worker_names():
    """The workers' names (and certificate CNs) in a cluster on one machine."""
    return ["worker0", "worker1", "worker2"]


def parse_host(host):
    """Split ``'host:port'`` into ``(host, port)``, with a clear error for anything else."""
    if not isinstance(host, str) or not host.strip():
        raise ClusterError("a worker address must be a 'host:port' string, got {!r}".format(host))
    host = host.strip()
    name, sep, port = host.rpartition(":")
    if not sep or not name:
        raise ClusterError(
            "worker address {!r} has no port: write it as 'host:port', e.g. "
            "'localhost:4000'".format(host)
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError("worker address {!r}: port must be a number in 1..65535".format(host))
    return name.strip("[]"), int(port)


def is_loopback(name):
    """True when a host name or address means this machine's loopback interface."""
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _port_in_use(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Mirror gRPC, which sets SO_REUSEADDR: only a live listener makes the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return False
    except OSError:
        return True
    finally:
        sock.close()


def _free_loopback_ports(n, avoid):
    """``n`` distinct free TCP ports on 127.0.0.1 (for the workers' TensorFlow servers and
    mesh links)."""
    ports = []
    while len(ports) < n:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        if port not in ports and port not in avoid:
            ports.append(port)
    return ports


def _format(name, port):
    return "{}:{}".format(name if ":" not in name else "[{}]".format(name), port)


class Cluster:
    """Three workers that hold secret shares and run the three-party protocol.

    Args:
        hosts: exactly three ``"host:port"`` strings: where the workers' APIs listen (mutual
            TLS). Loopback names (``localhost``, ``127.0.0.1``) keep everything on this machine.
        auto_managed: when True, :meth:`start` spawns the workers as local processes; when
            False, they are expected to run already (started by another process, by hand or
            by systemd).
        start_timeout: seconds to wait for all three workers to answer.

    ``Cluster`` objects are cheap: a client makes one with the same hosts to connect. The
    workers' TensorFlow servers are never reachable from owners or clients: they listen on
    loopback, on ports the cluster picks when it starts.
    """

    scheme = "aby3"  # privatekeras.Server: "ckks"

    def __init__(self, hosts, auto_managed=True, start_timeout=120.0):
        if isinstance(hosts, str):
            hosts = [hosts]
        hosts = list(hosts)
        if len(hosts) != 3:
            raise ClusterError(
                "a cluster needs exactly 3 workers (three-party computation), got {}: "
                "{}".format(len(hosts), hosts)
            )
        parsed = [parse_host(h) for h in hosts]
        if len({(n, p) for n, p in parsed}) != 3:
            raise ClusterError("the three workers need distinct addresses, got {}".format(hosts))
        local = [is_loopback(n) for n, _ in parsed]
        if auto_managed and len({p for _, p in parsed}) != 3:
            raise ClusterError("auto-managed workers need three distinct ports, got {}".format(
                hosts))
        self.hosts = [_format(n, p) for n, p in parsed]
        self.auto_managed = bool(auto_managed)
        self.start_timeout = float(start_timeout)
        self.loopback_only = all(local)
        self.worker_names = local_worker_names()
        self.config = None  # the hosts file, for a cluster made by from_config()
        self.party = None  # this process's party name in that file
        self._procs = []
        self._logdir = None
        self._made_credentials = False
        self._stubs = {}  # role -> [wire.Stub] x 3

    @classmethod
    def from_config(cls, path, name, start_timeout=120.0):
        """The cluster of a hosts file, as party ``name`` (the model owner or a client) sees
        it: the workers run on their own hosts (``privatekeras worker --config ...``); this
        process uses ``name``'s certificate."""
        from .deploy.hosts import ConfigError, load

        config = load(path)
        party = config.party(name)
        if party.role == "worker":
            raise ConfigError("{}: {!r} is a worker: run it with `privatekeras worker --config "
                              "{} --name {}`".format(config.path, name, config.path, name))
        cluster = cls(config.api_addresses, auto_managed=False, start_timeout=start_timeout)
        cluster.worker_names = [w.name for w in config.workers]
        cluster.config, cluster.party = config, name
        return cluster

    # -- credentials and channels ---------------------------------------------------------
    def _local_key(self):
        """The hosts as the throw-away CA's directory is named: loopback names unified."""
        return [_format("localhost" if is_loopback(n) else n, p)
                for n, p in map(parse_host, self.hosts)]

    def credentials(self, role):
        """This process's credentials for calling the workers as ``role`` (``"owner"`` or
        ``"client"``)."""
        if role not in LOCAL_ROLES:
            raise ValueError("role must be 'owner' or 'client', got {!r}".format(role))
        if self.config is not None:
            party = self.config.party(self.party)
            if party.role != role:
                raise ClusterError(
                    "this cluster was opened as {!r}, the {} in {}: acting as the {} needs "
                    "that party's own entry (Cluster.from_config(path, NAME))".format(
                        self.party, party.role, self.config.path, role))
            return self.config.credentials(self.party)
        from .deploy.pki import load_local

        return load_local(self._local_key(), role)

    def stubs(self, role):
        """A :class:`privatekeras.wire.Stub` per worker for calls as ``role`` (channels are
        opened once per cluster object and role)."""
        if role not in self._stubs:
            from . import wire

            creds = self.credentials(role)
            self._stubs[role] = [wire.Stub(wire.channel(h, creds, n))
                                 for h, n in zip(self.hosts, self.worker_names)]
        return self._stubs[role]

    def forget(self, role):
        """Close the channels opened for ``role`` (the next :meth:`stubs` reopens them)."""
        for stub in self._stubs.pop(role, []):
            stub.close()

    def status(self, role="owner", timeout=5.0):
        """Each worker's public board (``wire.M.Board``), asked as ``role``; raises
        WorkerUnavailableError (naming the worker) when one does not answer."""
        from . import wire

        futures = [s.Status.future(wire.M.Empty(), timeout=timeout) for s in self.stubs(role)]
        boards = []
        for name, future in zip(self.worker_names, futures):
            try:
                boards.append(future.result())
            except Exception as exc:  # noqa: BLE001 - translated below
                raise wire.translate(exc, name) from None
        return boards

    # -- description -------------------------------------------------------------------
    @property
    def pids(self):
        """PIDs of the auto-managed worker processes that are still running."""
        return [p.pid for p in self._procs if p.poll() is None]

    @property
    def running(self):
        """True when this object started the workers and all three are alive."""
        return len(self._procs) == 3 and all(p.poll() is None for p in self._procs)

    def __repr__(self):
        if self.auto_managed:
            state = "running (pids {})".format(self.pids) if self.running else "stopped"
        else:
            state = "external workers"
        return "<privatekeras.Cluster {} [{}]; {}>".format(
            ", ".join(self.hosts), state,
            "on this machine" if self.loopback_only else "APIs on named addresses")

    # -- lifecycle ---------------------------------------------------------------------
    def start(self):
        """Spawn the three workers, with a fresh throw-away CA for them, and wait until all
        answer. Returns self."""
        if not self.auto_managed:
            raise ClusterError(
                "this cluster is not auto-managed: start its workers with `privatekeras "
                "worker` on each host"
            )
        if self.running:
            return self
        self.stop()
        ports = []
        for host in self.hosts:
            name, port = parse_host(host)
            ports.append(port)
            if is_loopback(name) and _port_in_use(port):
                raise PortInUseError(
                    "port {} ({}) is already in use, by another program or another cluster; "
                    "choose other ports or stop the process that holds it".format(port, host)
                )
        from .deploy.confine import interposer_env
        from .deploy.pki import make_local

        base_env = interposer_env()
        make_local(self._local_key())
        self._made_credentials = True
        free = _free_loopback_ports(6, avoid=ports)
        compute, mesh = free[:3], free[3:]
        self._logdir = tempfile.mkdtemp(prefix="privatekeras-cluster-")
        say("starting 3 workers on {} ...".format(", ".join(self.hosts)))
        for i in range(3):
            env = dict(base_env, PRIVATEKERAS_CONFINE_PORTS="{},{}".format(compute[i], mesh[i]))
            self._launch(["--hosts", ",".join(self._local_key()), "--index", str(i),
                          "--compute", ",".join("127.0.0.1:{}".format(p) for p in compute),
                          "--mesh", ",".join("127.0.0.1:{}".format(p) for p in mesh)], env)
        return self._await_start()

    def _launch(self, args, env=None):
        """Start the next worker process (``privatekeras worker`` + ``args``), its output
        going to its log file in this cluster's log directory."""
        log = open(os.path.join(self._logdir, "worker{}.log".format(len(self._procs))), "w")
        cmd = [sys.executable, "-m", "privatekeras", "worker"] + list(args) + [
            "--parent-pid", str(os.getpid())]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._procs.append(proc)

    def _await_start(self):
        """Wait until every launched process is ready; stop them all if one is not."""
        _live_clusters.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _worker_log(self, i, tail=2000):
        if self._logdir is None:
            return ""
        try:
            with open(os.path.join(self._logdir, "worker{}.log".format(i))) as f:
                return f.read()[-tail:]
        except OSError:
            return ""

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        ready = set()
        last_report = 0.0
        while len(ready) < 3:
            for i, proc in enumerate(self._procs):
                if proc.poll() is not None:
                    raise ClusterError(
                        "worker {} ({}) exited with code {} during start-up:\n{}".format(
                            i, self.hosts[i], proc.returncode, self._worker_log(i))
                    )
                if i not in ready and "READY" in self._worker_log(i, tail=100000):
                    ready.add(i)
            now = time.monotonic()
            if now - last_report > 5 or len(ready) == 3:
                say("workers ready: {}/3".format(len(ready)))
                last_report = now
            if len(ready) == 3:
                break
            if now > deadline:
                missing = min(set(range(3)) - ready)
                raise ClusterError(
                    "workers did not start within {:.0f} s (ready: {}/3); last log of worker "
                    "{}:\n{}".format(self.start_timeout, len(ready), missing,
                                     self._worker_log(missing)))
            time.sleep(0.1)
        self.status()  # every worker answers over mutual TLS

    def stop(self, timeout=10.0):
        """End the auto-managed worker processes (by PID), free their ports and delete the
        throw-away CA's credentials. Does nothing to workers this object did not start."""
        for role in list(self._stubs):
            self.forget(role)
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if procs:
            say("workers stopped" if len(procs) > 1 else "server stopped")
        if self._made_credentials:
            from .deploy.pki import remove_local

            remove_local(self._local_key())
            self._made_credentials = False
        if self._logdir is not None:
            shutil.rmtree(self._logdir, ignore_errors=True)
            self._logdir = None
        return self

    def __enter__(self):
        return self.start() if self.auto_managed else self

    def __exit__(self, *exc):
        self.stop()


class Server(Cluster):
    """One server for encrypted predictions with CKKS (homomorphic encryption): the model
    owner uploads a linear model to it in clear, clients send rows encrypted under their own
    keys and decrypt the answers themselves. Same verbs as a :class:`Cluster`: ``start()``,
    ``stop()``, ``share()``, ``serve()``, ``connect()``, ``query()``.

    Args:
        host: ``"host:port"``: where the server's API listens (mutual TLS).
        scheme: ``"ckks"`` (the only one-server scheme).
        auto_managed: when True, :meth:`start` spawns the server as a local process (with a
            throw-away CA for it, the owner and clients); when False it runs already
            (``privatekeras worker --scheme ckks --hosts HOST:PORT``, same user).
        start_timeout: seconds to wait for the server to answer.
    """

    def __init__(self, host, scheme="ckks", auto_managed=True, start_timeout=60.0):
        if str(scheme).lower() != "ckks":
            raise ClusterError("a Server's scheme is 'ckks' (homomorphic encryption on one "
                               "server), got {!r}; three-party computation runs on a Cluster "
                               "of three workers".format(scheme))
        if isinstance(host, (list, tuple)):
            if len(host) != 1:
                raise ClusterError("a CKKS server has one address, got {}: {}".format(
                    len(host), list(host)))
            host = host[0]
        name, port = parse_host(host)
        self.hosts = [_format(name, port)]
        self.scheme = "ckks"
        self.auto_managed = bool(auto_managed)
        self.start_timeout = float(start_timeout)
        self.loopback_only = is_loopback(name)
        self.worker_names = ["worker0"]  # the certificate name of the one server
        self.config = None
        self.party = None
        self._procs = []
        self._logdir = None
        self._made_credentials = False
        self._stubs = {}

    @property
    def host(self):
        return self.hosts[0]

    @property
    def running(self):
        """True when this object started the server and it is alive."""
        return len(self._procs) == 1 and self._procs[0].poll() is None

    def __repr__(self):
        if self.auto_managed:
            state = "running (pid {})".format(self.pids[0]) if self.running else "stopped"
        else:
            state = "external server"
        return "<privatekeras.Server {} scheme=ckks [{}]; {}>".format(
            self.hosts[0], state, "on this machine" if self.loopback_only else
            "API on a named address")

    def start(self):
        """Spawn the server, with a fresh throw-away CA, and wait until it answers. Returns
        self."""
        if not self.auto_managed:
            raise ClusterError("this server is not auto-managed: start it with `privatekeras "
                               "worker --scheme ckks --hosts {}`".format(self.hosts[0]))
        if self.running:
            return self
        self.stop()
        name, port = parse_host(self.hosts[0])
        if is_loopback(name) and _port_in_use(port):
            raise PortInUseError(
                "port {} ({}) is already in use, by another program or another server; "
                "choose another port or stop the process that holds it".format(
                    port, self.hosts[0]))
        from .deploy.pki import make_local

        make_local(self._local_key())
        self._made_credentials = True
        self._logdir = tempfile.mkdtemp(prefix="privatekeras-server-")
        say("starting the CKKS server on {} ...".format(self.hosts[0]))
        self._launch(["--scheme", "ckks", "--hosts", self._local_key()[0]])
        return self._await_start()

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        proc = self._procs[0]
        while "READY" not in self._worker_log(0, tail=100000):
            if proc.poll() is not None:
                raise ClusterError("the CKKS server ({}) exited with code {} during "
                                   "start-up:\n{}".format(self.hosts[0], proc.returncode,
                                                          self._worker_log(0)))
            if time.monotonic() > deadline:
                raise ClusterError("the CKKS server did not start within {:.0f} s; its "
                                   "log:\n{}".format(self.start_timeout, self._worker_log(0)))
            time.sleep(0.05)
        say("CKKS server ready")
        self.status()  # it answers over mutual TLS

    @classmethod
    def from_config(cls, path, name, start_timeout=120.0):
        raise ClusterError("a CKKS server is not described by a hosts file yet: run it on "
                           "this machine (Server(...).start())")


def _stop_all():
    for cluster in list(_live_clusters):
        cluster.stop()


atexit.register(_stop_all)
