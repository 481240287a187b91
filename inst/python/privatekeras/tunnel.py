"""Mutual-TLS tunnels between the hosts of a cluster (workers, model owner, clients).

TensorFlow's gRPC servers have no authentication and no encryption, and execute any graph
sent to them. So on every host they stay on loopback, and one tunnel process per host links
them (see ``docs/security.md``)::

    python -m privatekeras.tunnel pki --config hosts.toml     # once: private CA + certificates
    python -m privatekeras.tunnel --config hosts.toml --name worker0   # next to each party

A party's tunnel

* listens on ``127.0.0.1:<tf_port>`` for every peer it may reach (the owner and clients
  reach the workers; workers reach each other) and forwards each connection to that peer's
  tunnel address over TLS 1.3, checking that the certificate presented is signed by the
  cluster's CA and names that peer;
* if the party has a ``tunnel`` address, accepts TLS 1.3 connections there, requires a
  client certificate signed by the cluster's CA whose name is a party allowed to reach it,
  and connects them to its own TensorFlow server on ``127.0.0.1:<tf_port>``. Anything else
  is refused and logged.

A peer's loopback port is open only while that peer's tunnel and TensorFlow server answer
(probed every few seconds), so an unreachable worker still looks unreachable to
:func:`privatekeras.cluster.wait_reachable` and gives a clear error instead of a hang.
"""

import argparse
import asyncio
import os
import signal
import ssl
import stat
import subprocess
import sys
import tempfile
import time

from .hosts import LOOPBACK, ConfigError, load

HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
PROBE_UP_INTERVAL = 5.0
PROBE_DOWN_INTERVAL = 0.5
CHUNK = 256 * 1024
# After the TLS handshake the connecting side sends one mode byte; the accepting side
# answers one status byte once it reached its TensorFlow server (then bytes flow both ways).
MODE_CONNECT, MODE_PROBE = b"C", b"P"
STATUS_OK = b"\x01"


def _log(name, msg):
    print("{} privatekeras.tunnel {}: {}".format(time.strftime("%H:%M:%S"), name, msg),
          file=sys.stderr, flush=True)


# -- certificates ---------------------------------------------------------------------------
def _openssl(*args):
    try:
        proc = subprocess.run(["openssl"] + list(args), capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("the `openssl` command is needed to make certificates (Debian: "
                          "apt-get install openssl)") from None
    if proc.returncode != 0:
        raise ConfigError("openssl {} failed:\n{}".format(args[0], proc.stderr[-2000:]))
    return proc.stdout


def _private_file(path):
    """Create (truncate) ``path`` with mode 0600 before anything secret is written to it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def make_ca(ca_cert, ca_key, days=825, subject="privatekeras cluster CA"):
    """Make a private CA (EC P-256 key, mode 0600) with the openssl CLI."""
    _private_file(ca_key)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", ca_key, "-out", ca_cert, "-days", str(days),
             "-subj", "/CN=" + subject,
             "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    os.chmod(ca_key, 0o600)


def issue_cert(ca_cert, ca_key, name, cert, key, days=825):
    """Issue a key (mode 0600) and a certificate for party ``name`` (CN and DNS SAN = name),
    valid for TLS client and server use, signed by the given CA."""
    _private_file(key)
    with tempfile.TemporaryDirectory(prefix="privatekeras-pki-") as tmp:
        csr = os.path.join(tmp, "req.csr")
        ext = os.path.join(tmp, "ext.cnf")
        with open(ext, "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n"
                    "subjectAltName=DNS:{}\n".format(name))
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=" + name)
        _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
                 "-set_serial", "0x" + os.urandom(16).hex(), "-days", str(days),
                 "-extfile", ext, "-out", cert)
    os.chmod(key, 0o600)


def make_pki(config, force=False, days=825):
    """Make the cluster's CA (if missing) and a key and certificate for every party of a
    hosts config that lacks one. Returns the list of files written.

    The CA key is written next to the CA certificate as ``<ca>.key`` (stem of ``cluster.ca``
    + ``.key``); keep it off the hosts once the certificates are issued. Each host needs only
    ``ca.crt`` and its own ``<name>.crt``/``<name>.key``.
    """
    ca_key = os.path.splitext(config.ca)[0] + ".key"
    written = []
    if force or not os.path.exists(config.ca):
        make_ca(config.ca, ca_key, days=days)
        written += [config.ca, ca_key]
        force = True  # a new CA invalidates every old certificate
    elif not os.path.exists(ca_key):
        raise ConfigError("{}: the CA certificate {} exists but its key {} does not: cannot "
                          "issue certificates (use --force to make a new CA)".format(
                              config.path, config.ca, ca_key))
    for party in config.parties:
        if force or not (os.path.exists(party.cert) and os.path.exists(party.key)):
            issue_cert(config.ca, ca_key, party.name, party.cert, party.key, days=days)
            written += [party.cert, party.key]
    return written


def _check_file(path, what, secret=False):
    if not os.path.exists(path):
        raise ConfigError("{} {} does not exist (make it with `python -m privatekeras.tunnel "
                          "pki --config HOSTS`)".format(what, path))
    if secret and os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError("{} {} is readable by other users: `chmod 600 {}`".format(
            what, path, path))


def server_context(config, party):
    """TLS 1.3 context for accepting peers: our certificate, client certificates required
    and checked against the cluster's CA."""
    _check_file(config.ca, "CA certificate (cluster.ca)")
    _check_file(party.cert, "certificate of {!r}".format(party.name))
    _check_file(party.key, "private key of {!r}".format(party.name), secret=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(config.ca)
    ctx.load_cert_chain(party.cert, party.key)
    return ctx


def client_context(config, party):
    """TLS 1.3 context for connecting to peers: presents our certificate, requires the
    peer's to be signed by the cluster's CA (its name is checked by :func:`peer_name`)."""
    _check_file(config.ca, "CA certificate (cluster.ca)")
    _check_file(party.cert, "certificate of {!r}".format(party.name))
    _check_file(party.key, "private key of {!r}".format(party.name), secret=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # peers are named by certificate CN, checked explicitly
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(config.ca)
    ctx.load_cert_chain(party.cert, party.key)
    return ctx


def peer_name(ssl_object):
    """The common name of the (already verified) certificate the peer presented, or None."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


# -- the tunnel -----------------------------------------------------------------------------
class Tunnel:
    """The tunnel of one party of a hosts config. :meth:`run` serves until cancelled.

    Args:
        config: a :class:`privatekeras.hosts.HostsConfig` (or a path to a hosts file).
        name: this party's name in it.
    """

    def __init__(self, config, name):
        self.config = load(config) if isinstance(config, (str, os.PathLike)) else config
        self.me = self.config.party(name)
        self.name = name
        # Who we forward to (peers with a tunnel we may reach), who may connect to us.
        self.peers = [p for p in self.config.parties
                      if p.tunnel is not None and self.config.may_connect(self.me, p)]
        self.allowed = {p.name for p in self.config.parties
                        if self.config.may_connect(p, self.me)}
        if self.me.tunnel is None and not self.peers:
            raise ConfigError("{}: party {!r} neither accepts connections (no tunnel) nor "
                              "reaches any peer".format(self.config.path, name))
        if self.peers and self.me.tf_port is None and self.me.role == "worker":
            raise ConfigError("{}: worker {!r} needs a tf_port".format(self.config.path, name))
        self.server_ctx = server_context(self.config, self.me) if self.me.tunnel else None
        self.client_ctx = client_context(self.config, self.me)
        self.stats = {"accepted": 0, "refused": 0, "forwarded": 0, "bytes_sent": 0,
                      "bytes_received": 0}
        self._listeners = {}
        self._tasks = set()

    def log(self, msg):
        """Log one line to stderr, prefixed with the time and this party's name."""
        _log(self.name, msg)

    # -- accepting peers (TLS in, plain TCP to our own TensorFlow server) ---------------
    async def _inbound(self, reader, writer):
        addr = writer.get_extra_info("peername")
        where = "{}:{}".format(*addr[:2]) if addr else "?"
        try:
            await writer.start_tls(self.server_ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as exc:
            self.stats["refused"] += 1
            self.log("refused {}: TLS handshake failed ({})".format(where, _reason(exc)))
            writer.transport.abort()
            return
        ssl_obj = writer.get_extra_info("ssl_object")
        who = peer_name(ssl_obj)
        if who not in self.allowed:
            self.stats["refused"] += 1
            self.log("refused {}: certificate name {!r} is not allowed to reach {} "
                     "(allowed: {})".format(where, who, self.name,
                                            ", ".join(sorted(self.allowed))))
            writer.transport.abort()
            return
        try:
            mode = await asyncio.wait_for(reader.readexactly(1), HANDSHAKE_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError, ssl.SSLError):
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, self.me.tf_port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            if mode != MODE_PROBE:
                self.log("{} from {}: our TensorFlow server {}:{} does not answer ({})".format(
                    who, where, LOOPBACK, self.me.tf_port, _reason(exc)))
            writer.transport.abort()
            return
        writer.write(STATUS_OK)
        if mode == MODE_PROBE:
            up_writer.transport.abort()
            await _close(writer)
            return
        self.stats["accepted"] += 1
        self.log("accepted {} from {} ({} {})".format(who, where, ssl_obj.version(),
                                                      ssl_obj.cipher()[0]))
        await self._splice(reader, writer, up_reader, up_writer)

    # -- reaching peers (plain TCP on our loopback, TLS out) -----------------------------
    async def _open(self, peer, mode):
        """A verified TLS connection to ``peer``'s tunnel, after its status byte."""
        host, port = peer.tunnel
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=self.client_ctx, server_hostname=peer.name,
                                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT), CONNECT_TIMEOUT)
        try:
            who = peer_name(writer.get_extra_info("ssl_object"))
            if who != peer.name:
                raise ConnectionError("{}:{} presented a certificate for {!r}, not {!r}".format(
                    host, port, who, peer.name))
            writer.write(mode)
            try:
                status = await asyncio.wait_for(reader.readexactly(1), CONNECT_TIMEOUT)
            except (asyncio.IncompleteReadError, ssl.SSLError, ConnectionError) as exc:
                raise ConnectionError(
                    "its tunnel closed the connection: its TensorFlow server is not running, or "
                    "it refused our certificate (see its log) [{}]".format(_reason(exc))) from None
            if status != STATUS_OK:
                raise ConnectionError("unexpected status {!r}".format(status))
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer

    async def _outbound(self, peer, reader, writer):
        try:
            up_reader, up_writer = await self._open(peer, MODE_CONNECT)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError,
                ConnectionError) as exc:
            self.log("cannot reach {} at {}:{}: {}".format(peer.name, *peer.tunnel,
                                                          _reason(exc)))
            writer.transport.abort()
            return
        self.stats["forwarded"] += 1
        ssl_obj = up_writer.get_extra_info("ssl_object")
        self.log("forwarding {}:{} to {} at {}:{} ({} {})".format(
            LOOPBACK, peer.tf_port, peer.name, *peer.tunnel, ssl_obj.version(),
            ssl_obj.cipher()[0]))
        await self._splice(up_reader, up_writer, reader, writer)

    async def _probe(self, peer):
        try:
            _, writer = await self._open(peer, MODE_PROBE)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError,
                ConnectionError) as exc:
            return _reason(exc)
        writer.transport.abort()
        return None

    async def _watch(self, peer):
        """Keep ``127.0.0.1:<peer.tf_port>`` open exactly while ``peer`` answers."""
        failures, last_reason = 0, None
        while True:
            reason = await self._probe(peer)
            if reason is None:
                failures = 0
                if peer.name not in self._listeners:
                    self._listeners[peer.name] = await asyncio.start_server(
                        lambda r, w, p=peer: self._spawn(self._outbound(p, r, w)),
                        LOOPBACK, peer.tf_port, reuse_address=True)
                    self.log("{} is up: listening on {}:{}".format(peer.name, LOOPBACK,
                                                                   peer.tf_port))
                await asyncio.sleep(PROBE_UP_INTERVAL)
                continue
            failures += 1
            if peer.name in self._listeners and failures >= 2:
                server = self._listeners.pop(peer.name)
                server.close()
                self.log("{} is down ({}): closed {}:{}".format(peer.name, reason, LOOPBACK,
                                                                 peer.tf_port))
            elif reason != last_reason and peer.name not in self._listeners:
                self.log("waiting for {} at {}:{} ({})".format(peer.name, *peer.tunnel, reason))
            last_reason = reason
            await asyncio.sleep(PROBE_DOWN_INTERVAL if peer.name not in self._listeners
                                else 1.0)

    # -- plumbing ------------------------------------------------------------------------
    def _spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _splice(self, tls_reader, tls_writer, reader, writer):
        """Copy bytes both ways between a TLS connection and a loopback one until either
        side closes."""
        async def pump(reader, writer, counter):
            try:
                while True:
                    data = await reader.read(CHUNK)
                    if not data:
                        break
                    self.stats[counter] += len(data)
                    writer.write(data)
                    await writer.drain()
            except (OSError, ssl.SSLError, ConnectionError):
                pass
            finally:
                writer.close()  # flushes what is buffered, then closes (TLS: close_notify)

        await asyncio.gather(pump(tls_reader, writer, "bytes_received"),
                             pump(reader, tls_writer, "bytes_sent"))

    async def run(self, ready=None):
        """Serve until cancelled. ``ready()`` is called once the TLS listener is bound."""
        server = None
        if self.me.tunnel is not None:
            host, port = self.me.listen
            try:
                server = await asyncio.start_server(
                    lambda r, w: self._spawn(self._inbound(r, w)), host, port,
                    reuse_address=True)
            except OSError as exc:
                raise ConfigError("{}: cannot listen on {}:{} (the tunnel/listen address of "
                                  "{!r}): {}".format(self.config.path, host, port, self.name,
                                                     exc)) from None
            self.log("accepting TLS 1.3 on {}:{} for {} (peers allowed: {})".format(
                host, port, self.me.tf_address, ", ".join(sorted(self.allowed))))
        watchers = [self._spawn(self._watch(p)) for p in self.peers]
        if ready is not None:
            ready()
        try:
            await asyncio.gather(*watchers) if watchers else await asyncio.Event().wait()
        finally:
            if server is not None:
                server.close()
            for listener in self._listeners.values():
                listener.close()
            for task in list(self._tasks):
                task.cancel()
            self.log("stopped ({})".format(", ".join(
                "{} {}".format(k, v) for k, v in self.stats.items())))


def _reason(exc):
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


async def _close(writer):
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except Exception:  # noqa: BLE001 - closing a connection the peer may have dropped
        pass


def serve(config, name):
    """Run the tunnel of party ``name`` in the foreground until SIGTERM or Ctrl-C."""
    tunnel = Tunnel(config, name)

    async def main():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await tunnel.run(ready=lambda: print("READY tunnel {}".format(name), flush=True))
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    return tunnel


def plan(config):
    """Human-readable lines describing which tunnel forwards what (``tunnel check``)."""
    lines = []
    for party in config.parties:
        peers = [p for p in config.parties if p.tunnel is not None and
                 config.may_connect(party, p)]
        allowed = sorted(p.name for p in config.parties if config.may_connect(p, party))
        lines.append("{} ({}): TensorFlow on {}".format(
            party.name, party.role, party.tf_address or "an ephemeral loopback port"))
        if party.tunnel:
            lines.append("  accepts TLS on {}:{} from {}".format(*party.listen,
                                                                 ", ".join(allowed)))
        for p in peers:
            lines.append("  forwards {}:{} -> {} at {}:{}".format(LOOPBACK, p.tf_port, p.name,
                                                                  *p.tunnel))
    return lines


def main(argv=None):
    """``python -m privatekeras.tunnel [run] --config HOSTS --name NAME`` | ``pki`` | ``check``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run"] + argv
    parser = argparse.ArgumentParser(prog="python -m privatekeras.tunnel",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run this party's tunnel (the default command)")
    run.add_argument("--config", required=True, help="hosts file (TOML)")
    run.add_argument("--name", required=True, help="this party's name in the hosts file")
    pki = sub.add_parser("pki", help="make the private CA and every party's key/certificate")
    pki.add_argument("--config", required=True, help="hosts file (TOML)")
    pki.add_argument("--force", action="store_true", help="new CA and certificates")
    pki.add_argument("--days", type=int, default=825, help="validity (default 825)")
    check = sub.add_parser("check", help="validate a hosts file and print what goes where")
    check.add_argument("--config", required=True, help="hosts file (TOML)")
    args = parser.parse_args(argv)
    try:
        if args.command == "pki":
            config = load(args.config)
            for path in make_pki(config, force=args.force, days=args.days):
                print("wrote", path)
            return 0
        if args.command == "check":
            config = load(args.config)
            print("\n".join(plan(config)))
            return 0
        serve(args.config, args.name)
        return 0
    except ConfigError as exc:
        print("privatekeras.tunnel: error: {}".format(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
