"""The hosts file: who takes part in a cluster whose parties run on separate hosts.

A hosts file (TOML) lists the three workers, the model owner and the clients, the TensorFlow
port each one uses on its *own* loopback interface, the address where each worker's tunnel
(:mod:`privatekeras.tunnel`) accepts mutual-TLS connections from the other hosts, and the
private CA and certificates that authenticate them. Example (``inst/examples/hosts.toml``)::

    [cluster]
    ca = "pki/ca.crt"          # the cluster's private CA (paths relative to this file)
    certs = "pki"              # holds <name>.crt and <name>.key for each party

    [[workers]]                # exactly three, in order: worker 0, 1, 2
    name = "worker0"
    tunnel = "10.0.0.1:7000"   # where this host's tunnel listens, reachable by the others
    tf_port = 4000             # this worker's TensorFlow server, on 127.0.0.1 of its host

    [owner]
    name = "owner"
    tf_port = 4100             # the owner process's own TensorFlow server (loopback only)

    [[clients]]
    name = "alice"
    tf_port = 4101

Every TensorFlow server stays on its host's loopback; a tunnel process on each host listens on
loopback at every *peer's* ``tf_port`` and forwards to that peer's tunnel over TLS 1.3 with
certificates checked on both ends. So every ``tf_port`` must be distinct across the file.
"""

import ipaddress
import os
import re

from .errors import ClusterError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")
LOOPBACK = "127.0.0.1"
ROLES = ("worker", "owner", "client")


class ConfigError(ClusterError):
    """A hosts file is missing, unreadable, or has a bad or missing field."""


class Party:
    """One party of a hosts file: a worker, the model owner or a client.

    Attributes:
        name: unique name; also the CN of the party's certificate.
        role: ``"worker"``, ``"owner"`` or ``"client"``.
        index: the worker's position (0, 1, 2); None for the owner and clients.
        tf_port: the party's TensorFlow server port on its own loopback (None: an ephemeral
            port chosen by TensorFlow, allowed for the owner and clients only).
        tunnel: ``(host, port)`` where the party's tunnel accepts TLS connections from the
            other hosts, or None (owner and clients need none: workers never connect to them).
        listen: ``(host, port)`` the tunnel binds for those connections (default: ``tunnel``).
        cert, key: paths of the party's certificate and private key.
    """

    def __init__(self, name, role, index, tf_port, tunnel, listen, cert, key):
        self.name, self.role, self.index = name, role, index
        self.tf_port, self.tunnel, self.listen = tf_port, tunnel, listen
        self.cert, self.key = cert, key

    @property
    def tf_address(self):
        """``"127.0.0.1:port"``: where every host reaches this party's TensorFlow server."""
        return None if self.tf_port is None else "{}:{}".format(LOOPBACK, self.tf_port)

    def __repr__(self):
        return "<Party {} ({}{}) tf_port={} tunnel={}>".format(
            self.name, self.role, "" if self.index is None else " {}".format(self.index),
            self.tf_port, None if self.tunnel is None else "{}:{}".format(*self.tunnel))


class HostsConfig:
    """A parsed, validated hosts file. Made by :func:`load`.

    Attributes:
        path: the file it was read from.
        job: TensorFlow job name of the workers.
        ca: path of the CA certificate that signs every party's certificate.
        workers: the three worker :class:`Party` objects, in order.
        owner: the model owner's :class:`Party` (None if the file lists none).
        clients: the client :class:`Party` objects.
    """

    def __init__(self, path, job, ca, workers, owner, clients):
        self.path, self.job, self.ca = path, job, ca
        self.workers, self.owner, self.clients = workers, owner, clients

    @property
    def parties(self):
        """All parties: workers, then the owner, then the clients."""
        return self.workers + ([self.owner] if self.owner else []) + self.clients

    def party(self, name):
        """The party called ``name``; a ConfigError listing the known names otherwise."""
        for p in self.parties:
            if p.name == name:
                return p
        raise ConfigError("{}: no party named {!r} (known: {})".format(
            self.path, name, ", ".join(p.name for p in self.parties)))

    @property
    def worker_addresses(self):
        """The workers' TensorFlow addresses as every host sees them (its own loopback)."""
        return [w.tf_address for w in self.workers]

    def may_connect(self, src, dst):
        """True when party ``src`` may open connections to party ``dst``'s TensorFlow server.

        Everyone may reach the workers; only workers may reach an owner or client (and only
        if that party exposes a tunnel at all).
        """
        if src.name == dst.name:
            return False
        return dst.role == "worker" or src.role == "worker"

    def __repr__(self):
        return "<HostsConfig {} workers={} owner={} clients={}>".format(
            self.path, [w.name for w in self.workers], self.owner and self.owner.name,
            [c.name for c in self.clients])


def _read_toml(path):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading {} needs Python 3.11+ (tomllib) or the 'tomli' "
                              "package".format(path)) from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("hosts file {} does not exist".format(path)) from None
    except OSError as exc:
        raise ConfigError("cannot read hosts file {}: {}".format(path, exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("hosts file {} is not valid TOML: {}".format(path, exc)) from None


def _address(value, where):
    """Parse ``"host:port"`` (IPv6 in brackets) into ``(host, port)``."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("{} must be a 'host:port' string, got {!r}".format(where, value))
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("{} must be 'host:port' with a port in 1..65535, got {!r}".format(
            where, value))
    return host, int(port)


def _port(value, where):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError("{} must be an integer in 1..65535, got {!r}".format(where, value))
    return value


def _resolve(base, value, where):
    if not isinstance(value, str) or not value:
        raise ConfigError("{} must be a file path string, got {!r}".format(where, value))
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


_KNOWN = {"name", "tunnel", "listen", "tf_port", "cert", "key"}


def _party(table, role, index, where, base, certs):
    if not isinstance(table, dict):
        raise ConfigError("{} must be a table, got {!r}".format(where, table))
    unknown = set(table) - _KNOWN
    if unknown:
        raise ConfigError("{}: unknown field(s) {} (known: {})".format(
            where, ", ".join(sorted(unknown)), ", ".join(sorted(_KNOWN))))
    name = table.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError("{}.name must be 1-63 letters, digits, '.' or '-' (starting with a "
                          "letter or digit), got {!r}".format(where, name))
    if role == "worker":
        if "tf_port" not in table:
            raise ConfigError("{}.tf_port is missing (the worker's TensorFlow port on its "
                              "host's loopback)".format(where))
        if "tunnel" not in table:
            raise ConfigError("{}.tunnel is missing (the 'host:port' where the worker's "
                              "tunnel accepts connections from the other hosts)".format(where))
    tf_port = _port(table["tf_port"], where + ".tf_port") if "tf_port" in table else None
    tunnel = _address(table["tunnel"], where + ".tunnel") if "tunnel" in table else None
    if tunnel is not None and tf_port is None:
        raise ConfigError("{}.tf_port is needed when {}.tunnel is given".format(where, where))
    if tunnel is not None:
        try:
            if ipaddress.ip_address(tunnel[0]).is_loopback:
                raise ConfigError("{}.tunnel {}:{} is a loopback address: the other hosts "
                                  "cannot reach it".format(where, *tunnel))
        except ValueError:
            pass  # a host name
    listen = _address(table["listen"], where + ".listen") if "listen" in table else tunnel
    if listen is not None and tunnel is None:
        raise ConfigError("{}.listen needs {}.tunnel".format(where, where))
    cert = _resolve(base, table.get("cert", os.path.join(certs, name + ".crt")), where + ".cert")
    key = _resolve(base, table.get("key", os.path.join(certs, name + ".key")), where + ".key")
    return Party(name, role, index, tf_port, tunnel, listen, cert, key)


def load(path):
    """Read and validate a hosts file; returns a :class:`HostsConfig`.

    Raises ConfigError naming the offending field (e.g. ``workers[1].tf_port``) when the
    file is missing, not TOML, or inconsistent (not three workers, duplicate names or ports).
    """
    path = os.path.abspath(os.fspath(path))
    try:
        return _load(path)
    except ConfigError as exc:
        if str(exc).startswith(path):
            raise
        raise ConfigError("{}: {}".format(path, exc)) from None


def _load(path):
    data = _read_toml(path)
    base = os.path.dirname(path)
    unknown = set(data) - {"cluster", "workers", "owner", "clients"}
    if unknown:
        raise ConfigError("{}: unknown section(s) {} (known: cluster, workers, owner, "
                          "clients)".format(path, ", ".join(sorted(unknown))))
    cluster = data.get("cluster", {})
    if not isinstance(cluster, dict):
        raise ConfigError("{}: [cluster] must be a table".format(path))
    extra = set(cluster) - {"ca", "certs", "job"}
    if extra:
        raise ConfigError("{}: unknown field(s) cluster.{} (known: ca, certs, job)".format(
            path, ", cluster.".join(sorted(extra))))
    if "ca" not in cluster:
        raise ConfigError("{}: cluster.ca is missing (path of the cluster's CA certificate; "
                          "make one with `python -m privatekeras.tunnel pki`)".format(path))
    ca = _resolve(base, cluster["ca"], "cluster.ca")
    certs = _resolve(base, cluster.get("certs", os.path.dirname(ca)), "cluster.certs")
    job = cluster.get("job", "pk")
    if not isinstance(job, str) or not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", job) or \
            job == "localhost":
        raise ConfigError("{}: cluster.job must be a TensorFlow job name (letters, digits, "
                          "'_'; not 'localhost'), got {!r}".format(path, job))

    workers = data.get("workers")
    if not isinstance(workers, list) or len(workers) != 3:
        raise ConfigError("{}: [[workers]] must list exactly 3 workers (three-party "
                          "computation), got {}".format(
                              path, len(workers) if isinstance(workers, list) else workers))
    parsed = [_party(t, "worker", i, "workers[{}]".format(i), base, certs)
              for i, t in enumerate(workers)]
    owner = None
    if "owner" in data:
        owner = _party(data["owner"], "owner", None, "owner", base, certs)
    clients = data.get("clients", [])
    if not isinstance(clients, list):
        raise ConfigError("{}: [[clients]] must be an array of tables".format(path))
    client_parties = [_party(t, "client", None, "clients[{}]".format(i), base, certs)
                      for i, t in enumerate(clients)]

    config = HostsConfig(path, job, ca, parsed, owner, client_parties)
    seen_names, seen_ports = {}, {}
    for p in config.parties:
        if p.name in seen_names:
            raise ConfigError("{}: party name {!r} is used twice".format(path, p.name))
        seen_names[p.name] = p
        if p.tf_port is not None:
            if p.tf_port in seen_ports:
                raise ConfigError(
                    "{}: tf_port {} is used by both {} and {}: every party's TensorFlow port "
                    "must be distinct (tunnels re-create them all on each host's "
                    "loopback)".format(path, p.tf_port, seen_ports[p.tf_port], p.name))
            seen_ports[p.tf_port] = p.name
    return config


def cluster_from_config(path, name, start_timeout=120.0):
    """A :class:`~privatekeras.Cluster` for party ``name`` (the owner or a client).

    The workers run on their own hosts (``python -m privatekeras.worker --config ...``), so
    the cluster is not auto-managed; their addresses are this host's loopback ports where the
    local tunnel (``python -m privatekeras.tunnel --config ... --name NAME``) forwards them.
    If the party has a ``tf_port``, this process's own TensorFlow server is fixed to it.
    """
    from .cluster import Cluster

    config = load(path)
    party = config.party(name)
    if party.role == "worker":
        raise ConfigError("{}: {!r} is a worker: run it with `python -m privatekeras.worker "
                          "--config {} --name {}`".format(config.path, name, config.path, name))
    from .loopback import loopback_active, warn_if_exposed

    if not loopback_active():
        warn_if_exposed(name)
    cluster = Cluster(config.worker_addresses, auto_managed=False, start_timeout=start_timeout,
                      local_address=party.tf_address)
    cluster.job_name = config.job
    return cluster


def worker_args(path, name):
    """``(hosts, index, job)`` for worker ``name`` of a hosts file (used by the worker CLI)."""
    config = load(path)
    party = config.party(name)
    if party.role != "worker":
        raise ConfigError("{}: {!r} is the {}, not a worker".format(config.path, name,
                                                                    party.role))
    return config.worker_addresses, party.index, config.job
