"""A cluster of exactly three workers, and the connection of this process to it."""

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

JOB_NAME = "pk"
LOOPBACK_NAMES = {"localhost", "ip6-localhost"}

_live_clusters = weakref.WeakSet()


def _log(msg):
    print("privatekeras: " + msg, file=sys.stderr, flush=True)


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


def _accepts(name, port, timeout=0.5):
    try:
        with socket.create_connection(("127.0.0.1" if is_loopback(name) else name, port),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def _child_env(loopback_only):
    """Environment for worker processes.

    The interpreter's own lib directory goes first on LD_LIBRARY_PATH: R puts the system
    library directory there, which makes a non-system Python load the wrong libpython.
    """
    from .kernels.build import loopback_library_path

    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [package_parent, env.get("PYTHONPATH", "")] if p
    )
    libdir = os.path.join(sys.base_prefix, "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in [libdir, env.get("LD_LIBRARY_PATH", "")] if p
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    if loopback_only:
        shim = loopback_library_path()
        if not os.path.exists(shim):
            from .kernels import KernelsMissingError

            raise KernelsMissingError(
                "the loopback interposer {} is missing: run `python -m privatekeras.kernels "
                "build`".format(shim)
            )
        preload.insert(0, shim)
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


class Cluster:
    """Three workers that hold secret shares and run the three-party protocol.

    Args:
        hosts: exactly three ``"host:port"`` strings. Loopback names (``localhost``,
            ``127.0.0.1``) make workers listen on loopback only; naming other addresses is
            the explicit request to listen beyond this machine.
        auto_managed: when True, :meth:`start` spawns the workers as local OS processes;
            when False, the workers are expected to run already (e.g. on other hosts).
        start_timeout: seconds to wait for all three workers to answer.
        local_address: optional fixed ``"host:port"`` for the TensorFlow server that
            connecting *this* process starts (its ``/job:localhost``). By default TensorFlow
            picks an ephemeral port; a fixed one lets a tunnel carry the workers'
            connections back to this process (see ``docs/security.md``).

    ``Cluster`` objects are cheap: a client makes one with the same hosts to connect.
    """

    def __init__(self, hosts, auto_managed=True, start_timeout=120.0, local_address=None):
        if isinstance(hosts, str):
            hosts = [hosts]
        hosts = list(hosts)
        if len(hosts) != 3:
            raise ClusterError(
                "a cluster needs exactly 3 workers (three-party computation), got {}: "
                "{}".format(len(hosts), hosts)
            )
        parsed = [parse_host(h) for h in hosts]
        ports = [p for _, p in parsed]
        if len(set(ports)) != 3 and len({(n, p) for n, p in parsed}) != 3:
            raise ClusterError("the three workers need distinct addresses, got {}".format(hosts))
        local = [is_loopback(n) for n, _ in parsed]
        if auto_managed and len(set(ports)) != 3 and any(local):
            raise ClusterError("auto-managed workers need three distinct ports, got {}".format(hosts))
        self.hosts = ["{}:{}".format(n if ":" not in n else "[{}]".format(n), p) for n, p in parsed]
        self.auto_managed = bool(auto_managed)
        self.start_timeout = float(start_timeout)
        self.loopback_only = all(local)
        self.job_name = JOB_NAME
        self._procs = []
        self._logdir = None
        self._before_stop = []  # callbacks that release this process's remote state
        self.local_address = None
        if local_address is not None:  # opt-in: a fixed address for this process's server
            name, port = parse_host(local_address)
            self.local_address = "{}:{}".format(name if ":" not in name else "[{}]".format(name),
                                                port)

    @classmethod
    def from_config(cls, path, name, start_timeout=120.0):
        """A Cluster for party ``name`` of a hosts file (workers on their own hosts).

        See :func:`privatekeras.hosts.cluster_from_config`.
        """
        from .hosts import cluster_from_config

        return cluster_from_config(path, name, start_timeout=start_timeout)

    # -- description -------------------------------------------------------------------
    @property
    def devices(self):
        """TensorFlow device names of the three workers."""
        return ["/job:{}/replica:0/task:{}/device:CPU:0".format(self.job_name, i) for i in range(3)]

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
        return "<privatekeras.Cluster {} [{}]; listening on {}>".format(
            ", ".join(self.hosts), state, "loopback only" if self.loopback_only else "named addresses"
        )

    # -- lifecycle ---------------------------------------------------------------------
    def start(self):
        """Spawn the three workers and wait until all answer. Returns self."""
        if not self.auto_managed:
            raise ClusterError(
                "this cluster is not auto-managed: start its workers with "
                "`python -m privatekeras.worker` on each host"
            )
        if self.running:
            return self
        self.stop()
        for host in self.hosts:
            name, port = parse_host(host)
            if not is_loopback(name):
                continue
            if _port_in_use(port):
                raise PortInUseError(
                    "port {} ({}) is already in use, by another program or another cluster; "
                    "choose other ports or stop the process that holds it".format(port, host)
                )
        env = _child_env(self.loopback_only)
        self._logdir = tempfile.mkdtemp(prefix="privatekeras-cluster-")
        _log("starting 3 workers on {} ...".format(", ".join(self.hosts)))
        for i in range(3):
            log = open(os.path.join(self._logdir, "worker{}.log".format(i)), "w")
            cmd = [sys.executable, "-m", "privatekeras.worker", "--hosts", ",".join(self.hosts),
                   "--index", str(i), "--job", self.job_name, "--parent-pid", str(os.getpid())]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            self._procs.append(proc)
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
                    if _accepts(*parse_host(self.hosts[i])):
                        ready.add(i)
            now = time.monotonic()
            if now - last_report > 5 or len(ready) == 3:
                _log("workers ready: {}/3".format(len(ready)))
                last_report = now
            if len(ready) == 3:
                break
            if now > deadline:
                raise ClusterError(
                    "workers did not start within {:.0f} s (ready: {}/3); last log of worker "
                    "{}:\n{}".format(self.start_timeout, len(ready), min(set(range(3)) - ready),
                                     self._worker_log(min(set(range(3)) - ready)))
                )
            time.sleep(0.1)

    def on_stop(self, callback):
        """Run ``callback()`` before the workers are stopped (releases remote functions)."""
        self._before_stop.append(callback)

    def stop(self, timeout=10.0):
        """End the auto-managed worker processes (by PID) and free their ports."""
        callbacks, self._before_stop = self._before_stop, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - the workers are stopped regardless
                pass
        if _connected == tuple(self.hosts):
            disconnect_process()  # while the workers still answer: a clean detach
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
            _log("workers stopped")
        if self._logdir is not None:
            shutil.rmtree(self._logdir, ignore_errors=True)
            self._logdir = None
        return self

    def __enter__(self):
        return self.start() if self.auto_managed else self

    def __exit__(self, *exc):
        self.stop()


def _stop_all():
    for cluster in list(_live_clusters):
        cluster.stop()


atexit.register(_stop_all)


# -- connecting this process ----------------------------------------------------------
_connected = None


def wait_reachable(cluster, timeout):
    """Wait until every worker accepts TCP connections; a clear error after ``timeout`` s.

    TensorFlow's own connect blocks without limit on an address where nothing listens.
    """
    deadline = time.monotonic() + timeout
    pending = list(cluster.hosts)
    reported = False
    while True:
        pending = [h for h in pending if not _accepts(*parse_host(h))]
        if not pending:
            return
        if time.monotonic() > deadline:
            from .errors import WorkerUnavailableError

            raise WorkerUnavailableError(
                "cannot reach worker(s) {} (waited {:.0f} s): is the cluster started? The "
                "model owner starts it with Cluster.start() / pk_start()".format(
                    ", ".join(pending), timeout))
        if not reported:
            _log("waiting for workers {} to answer ...".format(", ".join(pending)))
            reported = True
        time.sleep(0.2)


def connect_process(cluster, timeout=60.0, local_address=None):
    """Make the three workers' devices usable from this process (once per process).

    TensorFlow allows one cluster per process: connecting to a different one is an error.
    Unreachable workers give WorkerUnavailableError after ``timeout`` seconds.
    ``local_address`` (default: ``cluster.local_address``, else an ephemeral port chosen by
    TensorFlow) fixes the ``"host:port"`` of the TensorFlow server this process starts.
    """
    global _connected
    key = tuple(cluster.hosts)
    if _connected == key:
        return
    if _connected is not None:
        raise ClusterError(
            "this process is already connected to cluster {}; TensorFlow supports one cluster "
            "per process, so use a new process for {}".format(list(_connected), cluster.hosts)
        )
    wait_reachable(cluster, timeout)
    import tensorflow as tf

    if local_address is None:
        local_address = getattr(cluster, "local_address", None)
    # Processes of this machine create their contexts on the workers one at a time: two
    # simultaneous CreateContext calls have made a worker drop the connection (seen in CI).
    import fcntl
    import hashlib

    lock_path = os.path.join(tempfile.gettempdir(), "privatekeras-connect-{}.lock".format(
        hashlib.sha1(",".join(cluster.hosts).encode()).hexdigest()[:12]))
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with _quiet_native_stderr():  # TF's C++ logger announces the local server it starts
            if local_address is None:
                tf.config.experimental_connect_to_host(cluster.hosts, job_name=cluster.job_name)
            else:  # opt-in: this process's own server at a fixed address (tunnelled setups)
                tf.config.experimental_connect_to_cluster(
                    tf.train.ClusterSpec({cluster.job_name: list(cluster.hosts),
                                          "localhost": [local_address]}),
                    job_name="localhost")
    _connected = key


def is_connected(cluster):
    """Whether this process is connected to ``cluster`` now."""
    return _connected == tuple(cluster.hosts)


def disconnect_process():
    """Detach this process from its cluster, back to local TensorFlow only.

    While connected, TensorFlow registers every new ``tf.function`` (even a plain
    ``model.predict``) on the remote workers, so once they are gone such calls would hang.
    """
    global _connected
    if _connected is None:
        return
    import tensorflow as tf

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with _quiet_native_stderr():  # TF logs the server swap and closing remote contexts
        tf.config.experimental_connect_to_cluster(
            tf.train.ClusterSpec({"localhost": ["localhost:{}".format(port)]}),
            job_name="localhost")
    _connected = None


class _quiet_native_stderr:
    """Silence file descriptor 2 (C++ logging) for the duration of one expected-noisy call;
    Python exceptions still propagate."""

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
