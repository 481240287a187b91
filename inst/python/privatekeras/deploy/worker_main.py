"""``privatekeras worker``: run one worker (one process per party).

On one machine (what :meth:`privatekeras.Cluster.start` runs; credentials from the cluster's
throw-away CA, made by ``Cluster.start()`` or ``privatekeras pki --hosts ...``)::

    privatekeras worker --hosts localhost:4000,localhost:4001,localhost:4002 --index 0 \\
        --compute 127.0.0.1:14000,127.0.0.1:14001,127.0.0.1:14002

On its own host, from a hosts file (starts the stunnel links to the other workers too)::

    privatekeras worker --config hosts.toml --name worker0

The worker's TensorFlow server (its compute port) is confined to loopback: the process runs
with the bind() interposer preloaded for that port (it re-executes itself to get it) and, once
the server is up, checks what actually listens and refuses to go on if anything on the compute
port listens beyond loopback. It prints ``READY <index> <api address>`` when it serves.

``--scheme ckks --hosts HOST:PORT`` runs the one server of the CKKS backend instead
(:mod:`privatekeras.ckks.server`: the same API, one party, no TensorFlow server at all).
"""

import argparse
import os
import signal
import sys

CONFINE_ENV = "PRIVATEKERAS_CONFINE_PORTS"
REEXEC_ENV = "PRIVATEKERAS_WORKER_REEXEC"


def _parser():
    p = argparse.ArgumentParser(prog="privatekeras worker",
                                description="Run one privatekeras worker.")
    p.add_argument("--hosts", help="the three workers' API addresses, comma-separated "
                                   "(one machine; credentials of the local cluster)")
    p.add_argument("--index", type=int, help="this worker's position: 0, 1 or 2")
    p.add_argument("--compute", help="the three workers' TensorFlow addresses (127.0.0.1:PORT), "
                                     "comma-separated; default: each API port + 10000")
    p.add_argument("--compute-port", type=int, default=None,
                   help="the port this worker's TensorFlow server binds on 127.0.0.1, if not "
                        "the port of its --compute address (e.g. behind a port forwarder)")
    p.add_argument("--mesh", help="the three workers' mesh addresses (127.0.0.1:PORT; the links "
                                  "that carry the protocol's messages), comma-separated; "
                                  "default: each compute port + 1")
    p.add_argument("--mesh-port", type=int, default=None,
                   help="the port this worker's mesh listens on, on 127.0.0.1, if not the port "
                        "of its --mesh address")
    p.add_argument("--config", help="hosts file (workers on separate hosts)")
    p.add_argument("--name", help="this worker's name in the hosts file")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process (the one that started us) dies")
    p.add_argument("--scheme", choices=("aby3", "ckks"), default="aby3",
                   help="aby3 (default): one of three workers; ckks: the one server of the "
                        "CKKS backend (--hosts names its one address; no TensorFlow, no "
                        "compute port)")
    return p


def _main_ckks(args, parser):
    """``privatekeras worker --scheme ckks --hosts HOST:PORT``: the one CKKS server."""
    from ..ckks.server import CKKSServer, ServerConfig
    from ..errors import PrivateKerasError

    if args.config or not args.hosts or "," in args.hosts or args.index not in (None, 0):
        parser.error("--scheme ckks takes --hosts with the server's one address (and no "
                     "--config, --index other than 0)")
    host = args.hosts.strip()
    try:
        from .pki import load_local

        config = ServerConfig(host, load_local([host], "worker0"))
        server = CKKSServer(config).start()
    except PrivateKerasError as exc:
        print("privatekeras worker: {}".format(exc), file=sys.stderr, flush=True)
        return 2
    print("READY 0 {}".format(host), flush=True)
    server.wait()
    return 0


def _settings(args, parser):
    """``(WorkerConfig, hosts config or None)`` from the command line."""
    from ..cluster import local_worker_names, parse_host
    from ..worker import WorkerConfig

    if args.config:
        if not args.name:
            parser.error("--config needs --name (this worker's name in the hosts file)")
        from .hosts import load

        config = load(args.config)
        me = config.worker(args.name)
        listen = me.api_listen or me.api
        return WorkerConfig(
            me.index, [w.name for w in config.workers], config.api_addresses,
            config.compute_addresses, config.credentials(me.name),
            api_listen="{}:{}".format(*listen) if ":" not in listen[0] else "[{}]:{}".format(
                *listen),
            compute_port=args.compute_port, mesh=config.mesh_addresses,
            mesh_port=args.mesh_port), config
    if not args.hosts or args.index is None:
        parser.error("give --hosts and --index (one machine), or --config and --name")
    hosts = [h.strip() for h in args.hosts.split(",")]
    if len(hosts) != 3 or args.index not in (0, 1, 2):
        parser.error("--hosts lists exactly 3 workers and --index is 0, 1 or 2")
    compute = _three_addresses(parser, "--compute", args.compute) or [
        "127.0.0.1:{}".format(parse_host(h)[1] + 10000) for h in hosts]
    mesh = _three_addresses(parser, "--mesh", args.mesh)  # None: WorkerConfig's default
    from .pki import load_local

    names = local_worker_names()
    return WorkerConfig(args.index, names, hosts, compute,
                        load_local(hosts, names[args.index]),
                        compute_port=args.compute_port, mesh=mesh,
                        mesh_port=args.mesh_port), None


def _three_addresses(parser, flag, value):
    """The three comma-separated addresses given with ``flag``, or None if it was not given."""
    if not value:
        return None
    addresses = [a.strip() for a in value.split(",")]
    if len(addresses) != 3:
        parser.error("{} lists exactly 3 addresses".format(flag))
    return addresses


def _confine(ports, argv):
    """Re-execute with the loopback interposer preloaded for the compute and mesh ports,
    unless it is already (the check after start-up is what decides; this makes it pass)."""
    from .confine import interposer_active, interposer_env

    wanted = ",".join(str(p) for p in ports)
    if interposer_active() and os.environ.get(CONFINE_ENV) == wanted:
        return
    if os.environ.get(REEXEC_ENV):
        raise SystemExit("privatekeras worker: the loopback interposer did not load "
                         "(LD_PRELOAD={!r}); refusing to start".format(
                             os.environ.get("LD_PRELOAD")))
    env = interposer_env()
    env[CONFINE_ENV] = wanted
    env[REEXEC_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "privatekeras", "worker"] + argv, env)


def _die_with_parent(parent_pid):
    """Ask Linux to SIGTERM us when our parent dies, so a killed owner leaves no workers."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def main(argv=None):
    argv = list(sys.argv[2:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    if args.scheme == "ckks":
        return _main_ckks(args, parser)
    from ..errors import PrivateKerasError

    try:
        worker_config, hosts_config = _settings(args, parser)
        _confine(worker_config.confined_ports, argv)
        links = None
        if hosts_config is not None:
            from .links import Links

            links = Links.start(hosts_config, worker_config.name)
        from ..worker import WorkerServer
        from .listening import check_confined

        server = WorkerServer(worker_config).start()
        check_confined(worker_config.confined_ports)
    except PrivateKerasError as exc:
        print("privatekeras worker: {}".format(exc), file=sys.stderr, flush=True)
        return 2
    print("READY {} {}".format(worker_config.index, worker_config.api[worker_config.index]),
          flush=True)
    try:
        server.wait()
    finally:
        if links is not None:
            links.stop()
    return 0
