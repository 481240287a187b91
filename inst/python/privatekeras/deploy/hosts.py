"""The hosts file: who takes part in a cluster whose parties run on separate hosts.

A hosts file (TOML) lists the three workers, the model owner and the clients, and the private
CA that authenticates them all. Example (``inst/examples/hosts.toml``)::

    [cluster]
    ca = "pki/ca.crt"            # relative paths are relative to this file
    certs = "pki"                # <name>.crt / <name>.key per party (default: the CA's dir)

    [[workers]]                  # exactly three, in order: worker 0, 1, 2
    name = "worker0"
    api = "10.0.0.1:5000"        # gRPC API with mutual TLS: owners and clients connect here
    link = "10.0.0.1:7000"       # stunnel endpoint: the other workers connect here (TLS 1.3)
    compute_port = 4000          # its TensorFlow server, on 127.0.0.1 of its host only
    # mesh_port = 4001           # its mesh links, on 127.0.0.1 (default: compute_port + 1)

    [owner]
    name = "owner"

    [[clients]]
    name = "alice"

Each worker's TensorFlow server and its mesh (:mod:`privatekeras.deploy.mesh`, the links that
carry the protocol's messages) stay on its host's loopback, at ``compute_port`` and
``mesh_port``; the links (:mod:`privatekeras.deploy.links`) re-create the two peers' compute
and mesh ports on every worker host's loopback, so the six ports (three ``compute_port``, three
``mesh_port``) must all be distinct. With the default ``mesh_port`` (``compute_port + 1``),
that means compute ports at least two apart (4000, 4002, 4004, say).
"""

import ipaddress
import os

from ..errors import ClusterError
from . import pki

LOOPBACK = "127.0.0.1"
SECTIONS = ("cluster", "workers", "owner", "clients")
CLUSTER_FIELDS = ("ca", "certs")
WORKER_FIELDS = ("name", "api", "link", "compute_port", "mesh_port", "api_listen", "link_listen",
                 "cert", "key")
OTHER_FIELDS = ("name", "cert", "key")


class ConfigError(ClusterError):
    """A hosts file is missing, unreadable, or has a bad or missing field."""


def format_address(host, port):
    """``"host:port"``, with an IPv6 host in brackets."""
    return "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)


class Party:
    """One party of a hosts file: a worker, the model owner or a client.

    Attributes:
        name: unique name; the CN (and DNS name) of the party's certificate.
        role: ``"worker"``, ``"owner"`` or ``"client"``.
        index: the worker's position (0, 1, 2); None for the owner and clients.
        api, link: ``(host, port)`` where owners/clients reach the worker's API and where the
            other workers reach its link; None for the owner and clients.
        api_listen, link_listen: ``(host, port)`` the API server and stunnel bind (default:
            ``api`` and ``link``); None for the owner and clients.
        compute_port: the worker's TensorFlow port on 127.0.0.1 of its host; None otherwise.
        mesh_port: the port of the worker's mesh links on 127.0.0.1 of its host (default:
            ``compute_port + 1``); None for the owner and clients.
        cert, key: absolute paths of the party's certificate and private key.
    """

    def __init__(self, name, role, index=None, api=None, api_listen=None, link=None,
                 link_listen=None, compute_port=None, mesh_port=None, cert=None, key=None):
        self.name, self.role, self.index = name, role, index
        self.api, self.api_listen = api, api_listen
        self.link, self.link_listen = link, link_listen
        self.compute_port, self.mesh_port = compute_port, mesh_port
        self.cert, self.key = cert, key

    @property
    def api_address(self):
        """``"host:port"`` of the worker's API (IPv6 in brackets), or None."""
        return None if self.api is None else format_address(*self.api)

    @property
    def link_address(self):
        """``"host:port"`` of the worker's link (IPv6 in brackets), or None."""
        return None if self.link is None else format_address(*self.link)

    @property
    def compute_address(self):
        """``"127.0.0.1:port"``: where every worker host reaches this worker's TensorFlow
        server (its own, or the local end of a link); None for non-workers."""
        return None if self.compute_port is None else format_address(LOOPBACK, self.compute_port)

    @property
    def mesh_address(self):
        """``"127.0.0.1:port"``: where every worker host reaches this worker's mesh (its own
        listener, or the local end of a link); None for non-workers."""
        return None if self.mesh_port is None else format_address(LOOPBACK, self.mesh_port)

    def __repr__(self):
        if self.role != "worker":
            return "<Party {} ({})>".format(self.name, self.role)
        return "<Party {} (worker {}) api={} link={} compute_port={} mesh_port={}>".format(
            self.name, self.index, self.api_address, self.link_address, self.compute_port,
            self.mesh_port)


class HostsConfig:
    """A parsed, validated hosts file. Made by :func:`load`.

    Attributes:
        path: the file it was read from (absolute).
        ca: path of the CA certificate that signs every party's certificate.
        workers: the three worker :class:`Party` objects, in order.
        owner: the model owner's :class:`Party` (None if the file lists none).
        clients: the client :class:`Party` objects.
    """

    def __init__(self, path, ca, workers, owner, clients):
        self.path, self.ca = path, ca
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

    def worker(self, name):
        """The worker called ``name``; a ConfigError if it is not a worker of this file."""
        party = self.party(name)
        if party.role != "worker":
            raise ConfigError("{}: {!r} is the {}, not a worker (workers: {})".format(
                self.path, name, party.role, ", ".join(w.name for w in self.workers)))
        return party

    @property
    def api_addresses(self):
        """The three workers' API addresses, ``"host:port"``, in order."""
        return [w.api_address for w in self.workers]

    @property
    def compute_addresses(self):
        """The three workers' TensorFlow addresses as every worker host sees them:
        ``"127.0.0.1:<compute_port>"``, in order."""
        return [w.compute_address for w in self.workers]

    @property
    def mesh_addresses(self):
        """The three workers' mesh addresses as every worker host sees them:
        ``"127.0.0.1:<mesh_port>"``, in order."""
        return [w.mesh_address for w in self.workers]

    def credentials(self, name):
        """The :class:`~privatekeras.deploy.pki.Credentials` of party ``name``, read from its
        files (checked: key mode 0600, signed by ``cluster.ca``); the certificate must name
        that party and its role."""
        party = self.party(name)
        creds = pki.Credentials.from_files(self.ca, party.cert, party.key, name=party.name,
                                           role=party.role)
        if (creds.name, creds.role) != (party.name, party.role):
            raise pki.CredentialsError(
                "{}: certificate {} is for {!r} ({}), but the hosts file lists it for {!r} ({}): "
                "re-issue it with `privatekeras pki --config {} --force`".format(
                    self.path, party.cert, creds.name, creds.role, party.name, party.role,
                    self.path))
        return creds

    def __repr__(self):
        return "<HostsConfig {} workers={} owner={} clients={}>".format(
            self.path, [w.name for w in self.workers], self.owner and self.owner.name,
            [c.name for c in self.clients])


# -- parsing ----------------------------------------------------------------------------------
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


def _port(value, where):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError("{} must be an integer in 1..65535, got {!r}".format(where, value))
    return value


def _address(value, where):
    """``"host:port"`` (IPv6 in brackets) -> ``(host, port)``."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("{} must be a 'host:port' string, got {!r}".format(where, value))
    host, sep, port = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError("{}: write an IPv6 address in brackets, '[{}]:{}', got {!r}".format(
            where, host, port, value))
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("{} must be 'host:port' with a port in 1..65535, got {!r}".format(
            where, value))
    return host, int(port)


def _reachable(address, where, listen_field):
    """Refuse loopback and wildcard hosts for an address other hosts connect to."""
    host = address[0]
    if host.lower() == "localhost" or host.lower().startswith("localhost."):
        raise ConfigError("{} {} is a loopback name: the other hosts cannot reach it (give "
                          "this host's address or DNS name)".format(where,
                                                                   format_address(*address)))
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return address  # a host name
    if ip.is_loopback:
        raise ConfigError("{} {} is a loopback address: the other hosts cannot reach it (give "
                          "this host's address or DNS name)".format(where,
                                                                   format_address(*address)))
    if ip.is_unspecified:
        raise ConfigError("{} {} is a wildcard, not an address other hosts can connect to: "
                          "give this host's address, and put the wildcard in {}".format(
                              where, format_address(*address), listen_field))
    return address


def _path(base, value, where):
    if not isinstance(value, str) or not value:
        raise ConfigError("{} must be a file path string, got {!r}".format(where, value))
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _party(table, role, index, where, base, certs):
    if not isinstance(table, dict):
        raise ConfigError("{} must be a table, got {!r}".format(where, table))
    known = WORKER_FIELDS if role == "worker" else OTHER_FIELDS
    if role != "worker":
        worker_only = sorted(set(table) & (set(WORKER_FIELDS) - set(OTHER_FIELDS)))
        if worker_only:
            raise ConfigError("{}.{}: only workers have {} (the {} connects to the workers' "
                              "APIs and accepts no connections)".format(
                                  where, worker_only[0], ", ".join(WORKER_FIELDS[1:7]), role))
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError("{}: unknown field(s) {} (known: {})".format(
            where, ", ".join(unknown), ", ".join(known)))
    name = table.get("name")
    if name is None:
        raise ConfigError("{}.name is missing".format(where))
    try:
        pki.check_name(name, where + ".name")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cert = _path(base, table.get("cert", os.path.join(certs, name + ".crt")), where + ".cert")
    key = _path(base, table.get("key", os.path.join(certs, name + ".key")), where + ".key")
    if role != "worker":
        return Party(name, role, cert=cert, key=key)

    helps = {"api": "the 'host:port' where owners and clients reach this worker's API",
             "link": "the 'host:port' where the other workers reach this worker's link",
             "compute_port": "this worker's TensorFlow port on 127.0.0.1 of its host"}
    for field in ("api", "link", "compute_port"):
        if field not in table:
            raise ConfigError("{}.{} is missing ({})".format(where, field, helps[field]))
    api = _reachable(_address(table["api"], where + ".api"), where + ".api",
                     where + ".api_listen")
    link = _reachable(_address(table["link"], where + ".link"), where + ".link",
                      where + ".link_listen")
    compute_port = _port(table["compute_port"], where + ".compute_port")
    if "mesh_port" in table:
        mesh_port = _port(table["mesh_port"], where + ".mesh_port")
    elif compute_port < 65535:
        mesh_port = compute_port + 1
    else:
        raise ConfigError("{}.mesh_port is missing and its default, compute_port + 1, is not a "
                          "port (compute_port is 65535): give mesh_port".format(where))
    api_listen = (_address(table["api_listen"], where + ".api_listen")
                  if "api_listen" in table else api)
    link_listen = (_address(table["link_listen"], where + ".link_listen")
                   if "link_listen" in table else link)
    if api_listen[1] == link_listen[1] and (api_listen[0] == link_listen[0] or
                                           _wildcard(api_listen[0]) or
                                           _wildcard(link_listen[0])):
        raise ConfigError("{}: the API and the link cannot both listen on {}".format(
            where, format_address(*link_listen)))
    return Party(name, role, index, api=api, api_listen=api_listen, link=link,
                 link_listen=link_listen, compute_port=compute_port, mesh_port=mesh_port,
                 cert=cert, key=key)


def _wildcard(host):
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def load(path):
    """Read and validate a hosts file; returns a :class:`HostsConfig`.

    Raises ConfigError naming the file and the offending field (e.g.
    ``workers[1].compute_port``) when the file is missing, not TOML, or inconsistent.
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
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError("unknown section(s) {} (known: {})".format(
            ", ".join(unknown), ", ".join(SECTIONS)))
    cluster = data.get("cluster")
    if not isinstance(cluster, dict):
        raise ConfigError("[cluster] is missing or not a table (it gives `ca`, the cluster's "
                          "CA certificate)")
    extra = sorted(set(cluster) - set(CLUSTER_FIELDS))
    if extra:
        raise ConfigError("unknown field(s) cluster.{} (known: {})".format(
            ", cluster.".join(extra), ", ".join(CLUSTER_FIELDS)))
    if "ca" not in cluster:
        raise ConfigError("cluster.ca is missing (path of the cluster's CA certificate; make "
                          "it with `privatekeras pki --config {}`)".format(path))
    ca = _path(base, cluster["ca"], "cluster.ca")
    certs = _path(base, cluster.get("certs", os.path.dirname(ca)), "cluster.certs")

    workers = data.get("workers")
    if not isinstance(workers, list) or len(workers) != 3:
        raise ConfigError("[[workers]] must list exactly 3 workers (three-party computation), "
                          "got {}".format(len(workers) if isinstance(workers, list) else
                                          repr(workers)))
    parsed = [_party(t, "worker", i, "workers[{}]".format(i), base, certs)
              for i, t in enumerate(workers)]
    owner = _party(data["owner"], "owner", None, "owner", base, certs) if "owner" in data \
        else None
    clients = data.get("clients", [])
    if not isinstance(clients, list):
        raise ConfigError("[[clients]] must be an array of tables, got {!r}".format(clients))
    client_parties = [_party(t, "client", None, "clients[{}]".format(i), base, certs)
                      for i, t in enumerate(clients)]
    config = HostsConfig(path, ca, parsed, owner, client_parties)

    seen = {}
    for p in config.parties:
        if p.name in seen:
            raise ConfigError("party name {!r} is used twice ({} and {}): names must be "
                              "distinct (each is a certificate's name)".format(
                                  p.name, seen[p.name], _where(config, p)))
        seen[p.name] = _where(config, p)
    # Every worker host binds all six loopback ports: its own compute and mesh ports (its
    # TensorFlow server, its mesh), and its two peers' (the local ends of its links).
    ports = {}
    for field in ("compute_port", "mesh_port"):
        for w, table in zip(parsed, workers):
            port = getattr(w, field)
            where = "workers[{}].{}".format(w.index, field)
            if port in ports:
                default = field == "mesh_port" and field not in table
                raise ConfigError("{} {}{} is also {}: the three compute ports and the three "
                                  "mesh ports must all be distinct (every worker host binds all "
                                  "six on 127.0.0.1){}".format(
                                      where, port, " (compute_port + 1, the default)" if default
                                      else "", ports[port], "; give mesh_port, or leave gaps "
                                      "between the compute ports" if default else ""))
            ports[port] = where
    for w in parsed:
        for field in ("api_listen", "link_listen"):
            host, port = getattr(w, field)
            if port in ports and (_wildcard(host) or _is_loopback(host)):
                raise ConfigError("workers[{}].{} {} takes port {}, which is {}: every worker "
                                  "host binds all three compute ports and all three mesh ports "
                                  "on 127.0.0.1".format(w.index, field, format_address(host, port),
                                                        port, ports[port]))
    return config


def _is_loopback(host):
    """True for a loopback IP address or `localhost`."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _where(config, party):
    if party.role == "worker":
        return "workers[{}]".format(party.index)
    if party.role == "owner":
        return "owner"
    return "clients[{}]".format(config.clients.index(party))
