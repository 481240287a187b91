"""The workers' links across hosts, through stunnel (TLS 1.3, mutual certificates).

Two channels join the workers: TensorFlow's gRPC (the compute port) and the mesh
(:mod:`privatekeras.deploy.mesh`, the mesh port). Neither has TLS of its own between hosts, so
every worker's TensorFlow server stays on ``127.0.0.1:<compute_port>`` of its own host and its
mesh on ``127.0.0.1:<mesh_port>``, and on each worker host one stunnel process:

* accepts TLS 1.3 on the worker's ``link_listen`` (default ``link``), requires a client
  certificate chained to ``cluster.ca`` whose name is one of the two *other* workers, and
  connects it to ``127.0.0.1:<its compute_port>`` (service ``[<name>-in]``) -- or, when the
  client's TLS Server Name Indication is ``mesh.<name>``, to ``127.0.0.1:<its mesh_port>``
  (service ``[<name>-mesh-in]``, selected by stunnel's ``sni`` option);
* accepts plain TCP on ``127.0.0.1:<peer's compute_port>`` and ``127.0.0.1:<peer's
  mesh_port>`` for each of the two peers (``[to-<peer>]``, ``[mesh-to-<peer>]``) and connects
  it to that peer's ``link`` over TLS 1.3, sending no SNI for the compute port and
  ``mesh.<peer>`` for the mesh, checking the peer's certificate chain and name, presenting this
  worker's own certificate.

One public port per worker carries both channels. The SNI only picks the service; it
authorises nothing: stunnel gives the mesh service its own TLS context (an SNI-selected
secondary service inherits nothing from the primary one -- only the global options), so it
repeats the primary's certificate, CA, ``verifyChain``, ``requireCert`` and ``checkHost``
settings, and stunnel switches to that context's verification during the handshake. A client
that sends no SNI or any other name (e.g. a TLS client that sends the host name it dialled)
stays on the primary service, the compute port: stunnel 5.37 and later (Debian's stunnel4 is
5.68) keep the primary service for a name no ``sni`` pattern matches and log
``SNI: no pattern matched servername`` (older ones refused the handshake). Either way it
passes the same certificate checks.

Through a link, a peer's port that does not listen yet is not refused: the local stunnel
accepts, and the peer's stunnel closes the TLS connection when its own connect fails (the
mesh's dialer sees an EOF and retries).

So all three workers see the same ``127.0.0.1:<compute_port>`` and ``127.0.0.1:<mesh_port>``
cluster, and only the link ports listen beyond loopback. Usage::

    privatekeras links --config hosts.toml --name worker0            # foreground
    privatekeras links --config hosts.toml --name worker0 --print    # its stunnel config

or from Python, ``with Links.start(config, "worker0"): ...``.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ..errors import ClusterError
from . import pki
from .hosts import LOOPBACK, HostsConfig, load

LOG_TAIL = 8000
_ERROR_LINE = re.compile(r"^\[!\]|LOG[0-4]\[|\(\d+\)$")


def find_stunnel():
    """Path of the ``stunnel4`` (or ``stunnel``) program; ClusterError if not installed."""
    for name in ("stunnel4", "stunnel"):
        path = shutil.which(name) or shutil.which(
            name, path=os.pathsep.join(("/usr/bin", "/usr/sbin", "/usr/local/bin")))
        if path:
            return path
    raise ClusterError("stunnel is needed for the links between worker hosts but was not found "
                       "(Debian/Ubuntu: apt-get install stunnel4)")


def _stunnel_address(host, port):
    """stunnel's ``[HOST:]PORT``: an IPv6 host goes without brackets (stunnel 5.68 accepts
    '::1:7000' but fails to resolve '[::1]:7000')."""
    return "{}:{}".format(host, port)


def _config(config):
    return load(config) if not isinstance(config, HostsConfig) else config


def mesh_server_name(name):
    """The TLS Server Name Indication that selects worker ``name``'s mesh service on its link
    (the compute service is the default)."""
    return "mesh." + name


def stunnel_config(config, name, workdir=None):
    """The stunnel configuration text of worker ``name`` of a hosts config (or file path).

    ``workdir`` (where :class:`Links` keeps the file and stunnel's log) is only mentioned in a
    comment: stunnel runs in the foreground, writes no pid file and logs to stderr.
    """
    config = _config(config)
    me = config.worker(name)
    peers = [w for w in config.workers if w.name != name]
    files = ["cert = " + me.cert, "key = " + me.key, "CAfile = " + config.ca]
    tls = ["sslVersionMin = TLSv1.3", "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1"]
    # Both server services verify alike: the mesh service, a secondary one selected by SNI,
    # gets its own TLS context and inherits none of the primary's settings.
    verify_peers = files + ["verifyChain = yes", "requireCert = yes"] + [
        "checkHost = " + p.name for p in peers] + tls
    lines = [
        "; stunnel configuration of {}'s links to the other workers, made by privatekeras from"
        .format(name),
        "; {}{}".format(config.path, "" if workdir is None else " (workdir {})".format(workdir)),
        "foreground = yes",
        "pid =",
        "syslog = no",
        "debug = notice",  # notice: every accepted connection; refusals are warning/err
        "",
        "; TLS from the other workers -> this worker's TensorFlow server (no SNI, or any name",
        "; but the mesh's)",
        "[{}-in]".format(name),
        "accept = " + _stunnel_address(*me.link_listen),
        "connect = " + _stunnel_address(LOOPBACK, me.compute_port),
    ] + verify_peers + [
        "",
        "; TLS from the other workers on the same port, SNI {} -> this worker's mesh".format(
            mesh_server_name(name)),
        "[{}-mesh-in]".format(name),
        "sni = {}-in:{}".format(name, mesh_server_name(name)),
        "connect = " + _stunnel_address(LOOPBACK, me.mesh_port),
    ] + verify_peers
    for peer in peers:
        for service, port, sni in (("to-", peer.compute_port, ""),
                                   ("mesh-to-", peer.mesh_port, mesh_server_name(peer.name))):
            lines += [
                "",
                "; this host's 127.0.0.1:{} -> {}'s link, TLS, {}".format(
                    port, peer.name, "SNI " + sni if sni else "no SNI"),
                "[{}{}]".format(service, peer.name),
                "client = yes",
                "accept = " + _stunnel_address(LOOPBACK, port),
                "connect = " + _stunnel_address(*peer.link),
                # empty: none (by default stunnel sends the link's host name)
                "sni =" + (" " + sni if sni else ""),
            ] + files + [
                "verifyChain = yes",
                "checkHost = " + peer.name,
            ] + tls
    return "\n".join(lines) + "\n"


def _die_with_parent(parent_pid):
    """For ``preexec_fn``: have Linux SIGTERM the child when its parent thread dies."""
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl

    def preexec():
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _listening_ports(pid):
    """TCP ports on which process ``pid`` has a listening socket (Linux /proc)."""
    inodes = set()
    fd_dir = "/proc/{}/fd".format(pid)
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open("/proc/{}/net/{}".format(pid, table)) as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _tail(path, n=LOG_TAIL):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _important(log, n=20):
    """The error lines of a stunnel log ('[!]' and system errors ending in '(errno)' before
    its configuration is loaded, LOG0-LOG4 after), else its last lines."""
    lines = log.splitlines()
    errors = [line for line in lines if _ERROR_LINE.search(line)]
    return "\n".join((errors or lines)[-n:])


class Links:
    """A running stunnel process carrying one worker's links. Made by :meth:`start`."""

    def __init__(self, name, proc, workdir, config_path, log_path, own_workdir):
        self.name = name
        self._proc = proc
        self.workdir = workdir
        self.config_path = config_path
        self._log_path = log_path
        self._own_workdir = own_workdir

    @classmethod
    def start(cls, config, name, workdir=None, timeout=30.0):
        """Start stunnel for worker ``name`` of a hosts config (or file path).

        Checks the worker's credentials first (key mode 0600, certificate signed by
        ``cluster.ca`` and naming this worker), writes the stunnel config (0600) into
        ``workdir`` (default: a new private temp dir, removed by :meth:`stop`) and starts
        stunnel in the foreground, stderr to ``<workdir>/stunnel-<name>.log``. It gets SIGTERM
        when its parent dies (PR_SET_PDEATHSIG; Linux counts the *thread* that started it, so
        call this from the main thread or one that lives as long as the links). Returns once
        stunnel listens on the link port and on both peers' compute and mesh ports;
        ClusterError with the log's tail if stunnel exits first or ``timeout`` seconds pass.

        It checks the listening sockets in /proc instead of connecting: a test connection to
        a peer's compute or mesh port would open a TLS connection to that peer and a TCP
        connection to its TensorFlow server or its mesh.
        """
        config = _config(config)
        me = config.worker(name)
        config.credentials(name)  # clear errors now rather than in stunnel's log
        text = stunnel_config(config, name, workdir)
        stunnel = find_stunnel()
        own = workdir is None
        workdir = tempfile.mkdtemp(prefix="privatekeras-links-") if own else \
            os.path.abspath(os.fspath(workdir))
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        config_path = pki.write_private(os.path.join(workdir, "stunnel-{}.conf".format(name)),
                                        text)
        log_path = os.path.join(workdir, "stunnel-{}.log".format(name))
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # stunnel's local ends of the links (the peers' compute and mesh ports on this host's
        # loopback) admit only processes of this user, like the worker's own ports.
        from .confine import interposer_env

        local_ends = [p for w in config.workers if w is not me
                      for p in (w.compute_port, w.mesh_port)]
        env = dict(interposer_env(),
                   PRIVATEKERAS_CONFINE_PORTS=",".join(str(p) for p in local_ends))
        try:
            proc = subprocess.Popen([stunnel, config_path], stdin=subprocess.DEVNULL, env=env,
                                    stdout=log_fd, stderr=log_fd, close_fds=True,
                                    start_new_session=True,  # a terminal's Ctrl-C is ours
                                    preexec_fn=_die_with_parent(os.getpid()))
        except BaseException:
            if own:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        finally:
            os.close(log_fd)
        links = cls(name, proc, workdir, config_path, log_path, own)
        wanted = {me.link_listen[1]} | set(local_ends)
        try:
            links._wait_listening(wanted, timeout)
        except BaseException:
            links.stop(remove=False)
            raise
        return links

    def _wait_listening(self, wanted, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                self._fail("stunnel for {} exited with code {} before it listened on ports "
                           "{}".format(self.name, self._proc.returncode, sorted(wanted)))
            try:
                missing = wanted - _listening_ports(self._proc.pid)
            except OSError:  # it is exiting
                missing = wanted
            if not missing:
                return
            if time.monotonic() > deadline:
                self._fail("stunnel for {} does not listen on port(s) {} after {:.0f} s".format(
                    self.name, sorted(missing), timeout))
            time.sleep(0.05)

    def _fail(self, message):
        log = _tail(self._log_path)
        hint = (" (another process already listens on one of those ports)"
                if "Address already in use" in log else "")
        raise ClusterError("{}{}; stunnel's log {} says:\n{}".format(
            message, hint, self._log_path, _important(log)))

    @property
    def pid(self):
        """The stunnel process's PID."""
        return self._proc.pid

    @property
    def log_path(self):
        """Path of stunnel's log (its stderr)."""
        return self._log_path

    @property
    def running(self):
        """True while stunnel runs."""
        return self._proc.poll() is None

    def wait(self, timeout=None):
        """Wait for stunnel to exit; returns its exit code (TimeoutExpired after ``timeout``)."""
        return self._proc.wait(timeout)

    def stop(self, remove=True):
        """Stop stunnel (SIGTERM, then SIGKILL after 5 s). Removes the temp workdir that
        :meth:`start` made, unless ``remove`` is False."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if remove and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return "<Links {} pid={} {}>".format(self.name, self.pid,
                                             "running" if self.running else "stopped")


def main(argv=None):
    """``privatekeras links --config HOSTS --name WORKER [--print] [--workdir DIR]``: print
    the worker's stunnel config, or run its links in the foreground until SIGTERM/Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="privatekeras links",
        description="Run a worker's TLS links to the other workers (stunnel), in the "
                    "foreground.")
    parser.add_argument("--config", required=True, help="hosts file (TOML)")
    parser.add_argument("--name", required=True, help="this worker's name in the hosts file")
    parser.add_argument("--print", action="store_true", help="print the stunnel config and exit")
    parser.add_argument("--workdir", help="where to keep the stunnel config and log (default: "
                                          "a private temp dir, removed on exit)")
    args = parser.parse_args(argv)
    prog = "privatekeras links"
    try:
        if args.print:
            sys.stdout.write(stunnel_config(args.config, args.name, args.workdir))
            return 0
        stop = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.append(True))
        links = Links.start(args.config, args.name, workdir=args.workdir)
    except ClusterError as exc:
        print("{}: error: {}".format(prog, exc), file=sys.stderr)
        return 2
    print("READY links {} (stunnel pid {}, log {})".format(args.name, links.pid,
                                                          links.log_path), flush=True)
    try:
        while not stop and links.running:
            time.sleep(0.2)
        if not stop:
            print("{}: error: stunnel exited with code {}; its log {} says:\n{}".format(
                prog, links.wait(), links.log_path, _important(_tail(links.log_path))),
                file=sys.stderr)
            return 1
        return 0
    finally:
        links.stop()


if __name__ == "__main__":
    sys.exit(main())
