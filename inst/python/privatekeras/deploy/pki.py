"""Certificates of a cluster: a private CA and one key and certificate per party.

Every party (the three workers, the model owner, the clients) proves who it is with a
certificate issued by the cluster's own CA: its name is the certificate's common name (and
its DNS subject alternative name), its role (``worker``, ``owner`` or ``client``) the
organisational unit. Keys are EC P-256, made with the ``cryptography`` package.

Two ways to get them:

* a hosts file (:mod:`privatekeras.deploy.hosts`) for parties on separate hosts:
  ``privatekeras pki --config hosts.toml`` makes the CA and every party's key/certificate
  (:func:`make_pki`); each host gets ``ca.crt`` and its own pair, the CA key stays offline;
* a cluster on one machine: :func:`make_local` makes a throw-away CA in a private per-user
  directory, issues certificates for ``worker0..2``, ``owner`` and ``client``, and forgets
  the CA key, so nobody can issue more; :func:`load_local` reads them back.
"""

import argparse
import datetime
import functools
import hashlib
import os
import re
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field

from ..errors import ClusterError

ROLES = ("worker", "owner", "client")
LOCAL_NAMES = ("worker0", "worker1", "worker2", "owner", "client")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")
_SKEW = datetime.timedelta(minutes=5)  # certificates start a little in the past
_MAKE_HINT = ("make the cluster's certificates with `privatekeras pki --config HOSTS`, or copy "
              "them from the host that keeps the CA")


def _crypto():
    """The ``cryptography`` names this module uses, imported on first use: making and
    checking certificates needs it, but a client that only loads its credentials does not
    (its TLS library checks them at the handshake)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return x509, InvalidSignature, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


class CredentialsError(ClusterError):
    """A party's CA, certificate or key is missing, unsafe, or does not fit together."""


def check_name(name, what="name"):
    """Return ``name`` if it is a valid party name (1-63 letters, digits, '.', '-', starting
    with a letter or digit), else raise ValueError naming ``what``."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError("{} must be 1-63 letters, digits, '.' or '-' (starting with a letter "
                         "or digit), got {!r}".format(what, name))
    return name


def check_role(role, what="role"):
    """Return ``role`` if it is one of :data:`ROLES`, else raise ValueError naming ``what``."""
    if role not in ROLES:
        raise ValueError("{} must be one of {}, got {!r}".format(what, ", ".join(ROLES), role))
    return role


# -- making certificates ------------------------------------------------------------------------
def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _serial():
    """A random positive 128-bit serial number."""
    return int.from_bytes(os.urandom(16), "big") or 1


def _key_pem(key):
    serialization = _crypto()[3]
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert):
    serialization = _crypto()[3]
    return cert.public_bytes(serialization.Encoding.PEM)


def _as_bytes(data):
    return data.encode("ascii") if isinstance(data, str) else bytes(data)


def make_ca(subject="privatekeras cluster CA", days=825):
    """Make a private CA. Returns ``(cert_pem, key_pem)`` (bytes).

    EC P-256 key; a self-signed certificate with basicConstraints CA:TRUE, pathlen 0 and
    keyUsage keyCertSign, cRLSign (both critical), a random 128-bit serial, valid ``days``.
    """
    if not isinstance(days, int) or days < 1:
        raise ValueError("days must be a positive integer, got {!r}".format(days))
    x509, _, hashes, _, ec, _, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def issue(ca_cert_pem, ca_key_pem, name, role, days=825):
    """Issue a key and certificate for party ``name`` with role ``role``, signed by the CA.

    Returns ``(cert_pem, key_pem)``. EC P-256 key; subject CN=name, OU=role; SAN DNS:name;
    extendedKeyUsage serverAuth + clientAuth; keyUsage digitalSignature and basicConstraints
    CA:FALSE (both critical); a random serial; valid ``days`` (never beyond the CA).
    """
    x509, _, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID = _crypto()
    check_name(name)
    check_role(role)
    if not isinstance(days, int) or days < 1:
        raise ValueError("days must be a positive integer, got {!r}".format(days))
    ca_cert = x509.load_pem_x509_certificate(_as_bytes(ca_cert_pem))
    ca_key = serialization.load_pem_private_key(_as_bytes(ca_key_pem), password=None)
    if ca_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            ca_cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ValueError("the CA key does not belong to the CA certificate")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - _SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def identity(cert_pem):
    """``(name, role)`` of a certificate: its common name and organisational unit.

    Raises ValueError if either is missing or invalid. Does not check who signed it: call it
    on certificates TLS has already verified (e.g. grpc's ``x509_pem_cert``). Results are
    cached by the PEM bytes (the same peers call again and again).
    """
    return _identity(_as_bytes(cert_pem))


@functools.lru_cache(maxsize=64)
def _identity(pem):
    x509, _, _, _, _, _, NameOID = _crypto()
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ValueError("not a PEM certificate: {}".format(exc)) from None
    values = {}
    for oid, what in ((NameOID.COMMON_NAME, "common name (CN)"),
                      (NameOID.ORGANIZATIONAL_UNIT_NAME, "organisational unit (OU, the role)")):
        attrs = cert.subject.get_attributes_for_oid(oid)
        if len(attrs) != 1:
            raise ValueError("the certificate of {} has {} {} attributes, needs exactly one".format(
                cert.subject.rfc4514_string(), len(attrs), what))
        values[oid] = attrs[0].value
    name = check_name(values[NameOID.COMMON_NAME], "the certificate's common name")
    role = check_role(values[NameOID.ORGANIZATIONAL_UNIT_NAME], "the certificate's role (OU)")
    return name, role


# -- files ----------------------------------------------------------------------------------
def _write(path, data, mode):
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:  # mkstemp made it 0600: nothing secret is ever readable by others
        if mode != 0o600:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(_as_bytes(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_private(path, data):
    """Write ``data`` to ``path`` with mode 0600, atomically (a 0600 temp file in the same
    directory, then ``os.replace``). Missing parent directories are made with mode 0700."""
    return _write(path, data, 0o600)


def write_public(path, data):
    """Write ``data`` to ``path`` with mode 0644, atomically (see :func:`write_private`)."""
    return _write(path, data, 0o644)


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CredentialsError("{} {} does not exist ({})".format(what, path, _MAKE_HINT)) \
            from None
    except OSError as exc:
        raise CredentialsError("cannot read {} {}: {}".format(what, path, exc)) from None


@dataclass(frozen=True)
class Credentials:
    """What a party needs for mutual TLS: its name and role, and PEM bytes of the cluster's
    CA certificate, its own certificate and its private key (not shown by ``repr``)."""

    name: str
    role: str
    ca: bytes = field(repr=False)
    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)

    @classmethod
    def from_files(cls, ca_path, cert_path, key_path, name=None, role=None):
        """Read and check a party's CA certificate, certificate and key.

        Refuses (CredentialsError, naming the file and the fix) a missing or unparsable file,
        a key readable by group or others, a key that is not the certificate's, a certificate
        not signed by that CA or outside its validity period. Name and role come from the
        certificate.

        Without the ``cryptography`` package (a client's small environment), only the files'
        presence and the key's mode are checked here, the TLS handshake checks the rest, and
        ``name`` and ``role`` must be given by the caller.
        """
        ca_path, cert_path, key_path = (os.fspath(p) for p in (ca_path, cert_path, key_path))
        ca_pem = _read(ca_path, "CA certificate")
        cert_pem = _read(cert_path, "certificate")
        key_pem = _read(key_path, "private key")
        mode = os.stat(key_path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CredentialsError("private key {} is accessible by other users (mode {:o}): "
                                   "chmod 600 {}".format(key_path, mode & 0o777, key_path))
        try:
            x509, InvalidSignature, _, serialization, _, _, _ = _crypto()
        except ImportError:
            if name is None or role is None:
                raise CredentialsError("reading the name and role of certificate {} needs the "
                                       "'cryptography' package".format(cert_path)) from None
            return cls(check_name(name), check_role(role), ca_pem, cert_pem, key_pem)
        try:
            ca = x509.load_pem_x509_certificate(ca_pem)
        except ValueError:
            raise CredentialsError("CA certificate {} is not a PEM certificate".format(
                ca_path)) from None
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise CredentialsError("certificate {} is not a PEM certificate".format(
                cert_path)) from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise CredentialsError("private key {} is not an unencrypted PEM key".format(
                key_path)) from None
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise CredentialsError(
                "certificate {} is not signed by the CA {}: re-issue it with `privatekeras pki "
                "--config HOSTS --force`, or point cluster.ca at the CA that issued it".format(
                    cert_path, ca_path)) from None
        der = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if key.public_key().public_bytes(*der) != cert.public_key().public_bytes(*der):
            raise CredentialsError("private key {} does not belong to certificate {} (copy the "
                                   "pair that was issued together)".format(key_path, cert_path))
        now = _now()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CredentialsError("certificate {} is valid only from {} to {}: re-issue it with "
                                   "`privatekeras pki --config HOSTS --force`".format(
                                       cert_path, cert.not_valid_before_utc,
                                       cert.not_valid_after_utc))
        try:
            name, role = identity(cert_pem)
        except ValueError as exc:
            raise CredentialsError("certificate {}: {}".format(cert_path, exc)) from None
        return cls(name, role, ca_pem, cert_pem, key_pem)


# -- throw-away credentials of a cluster on this machine ---------------------------------------
def runtime_base():
    """The per-user directory that holds local clusters' credentials.

    ``$PRIVATEKERAS_RUNTIME_DIR`` if set; else ``$XDG_RUNTIME_DIR/privatekeras`` if that is a
    directory owned by this user; else ``~/.cache/privatekeras/run``.
    """
    env = os.environ.get("PRIVATEKERAS_RUNTIME_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        try:
            st = os.stat(xdg)
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            return os.path.join(xdg, "privatekeras")
    return os.path.join(os.path.expanduser("~"), ".cache", "privatekeras", "run")


def _check_hosts(hosts):
    hosts = list(hosts) if not isinstance(hosts, str) else [hosts]
    # 3: a cluster's workers; 1: the one server of the CKKS backend (privatekeras.Server)
    if len(hosts) not in (1, 3) or not all(isinstance(h, str) and h for h in hosts):
        raise ValueError("hosts must be the cluster's 3 'host:port' strings (or a CKKS "
                         "server's one), got {!r}".format(hosts))
    return hosts


def local_dir(hosts):
    """The directory of a local cluster's credentials: :func:`runtime_base` plus the first 16
    hex digits of the SHA-256 of its three ``"host:port"`` strings (as given)."""
    digest = hashlib.sha256(",".join(_check_hosts(hosts)).encode("utf-8")).hexdigest()[:16]
    return os.path.join(runtime_base(), digest)


def _check_private_dir(path, follow):
    st = os.stat(path) if follow else os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CredentialsError("{} is not a directory: remove it, or set PRIVATEKERAS_RUNTIME_DIR "
                               "to a private directory of your own".format(path))
    if st.st_uid != os.getuid():
        raise CredentialsError("{} belongs to uid {}, not to this user (uid {}): set "
                               "PRIVATEKERAS_RUNTIME_DIR to a private directory of your "
                               "own".format(path, st.st_uid, os.getuid()))
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError("{} is accessible by other users (mode {:o}): chmod 700 {}, or "
                               "set PRIVATEKERAS_RUNTIME_DIR to a private directory".format(
                                   path, st.st_mode & 0o777, path))


def _private_dir(path, follow):
    """Make ``path`` (mode 0700) if missing; refuse it unless it is ours and private."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    _check_private_dir(path, follow)


def make_local(hosts):
    """Make fresh throw-away credentials for the local cluster ``hosts``; returns their dir.

    A new CA issues certificates for ``worker0``, ``worker1``, ``worker2`` (role worker),
    ``owner`` and ``client``; written as ``ca.crt``, ``<name>.crt`` and ``<name>.key``
    (0600) into :func:`local_dir` (made with mode 0700; it and the base directory must belong
    to this user and be private). The CA key is never written: nobody can issue more.
    """
    directory = local_dir(hosts)
    base = os.path.dirname(directory)
    os.makedirs(os.path.dirname(base), mode=0o700, exist_ok=True)
    _private_dir(base, follow=True)
    _private_dir(directory, follow=False)
    ca_cert, ca_key = make_ca(subject="privatekeras local cluster CA", days=825)
    for name in LOCAL_NAMES:
        role = "worker" if name.startswith("worker") else name
        cert, key = issue(ca_cert, ca_key, name, role)
        write_private(os.path.join(directory, name + ".key"), key)
        write_public(os.path.join(directory, name + ".crt"), cert)
    write_public(os.path.join(directory, "ca.crt"), ca_cert)
    return directory  # ca_key dies with this frame: it was never written


def load_local(hosts, name):
    """The :class:`Credentials` of party ``name`` (``worker0``..``worker2``, ``owner`` or
    ``client``) of the local cluster ``hosts``, as made by :func:`make_local`.

    Raises CredentialsError when they are missing: the cluster was not started by this user
    on this machine.
    """
    if name not in LOCAL_NAMES:
        raise ValueError("name must be one of {}, got {!r}".format(", ".join(LOCAL_NAMES), name))
    directory = local_dir(hosts)
    files = [os.path.join(directory, f) for f in ("ca.crt", name + ".crt", name + ".key")]
    if not all(os.path.exists(f) for f in files):
        raise CredentialsError(
            "no credentials for the cluster {} in {}: the cluster is not started by this user "
            "on this machine: start it with Cluster.start() / pk_start(), or use a hosts file "
            "(Cluster.from_config)".format(", ".join(_check_hosts(hosts)), directory))
    _check_private_dir(os.path.dirname(directory), follow=True)
    _check_private_dir(directory, follow=False)
    return Credentials.from_files(*files, name=name,
                                  role="worker" if name.startswith("worker") else name)


def remove_local(hosts):
    """Delete the local cluster's credentials directory (nothing happens if it is missing)."""
    directory = local_dir(hosts)
    if os.path.lexists(directory):
        shutil.rmtree(directory)


# -- the certificates of a hosts file -------------------------------------------------------------
def ca_key_path(config):
    """Where :func:`make_pki` keeps the CA key of a hosts config: ``<stem of cluster.ca>.key``."""
    return os.path.splitext(config.ca)[0] + ".key"


def make_pki(config, force=False, days=825):
    """Make the CA of a hosts config (if missing) and a key and certificate for every party
    that lacks one. Returns the list of files written.

    The CA certificate goes to ``cluster.ca``, its key to :func:`ca_key_path` (0600); with
    ``force`` a new CA re-issues everything. Each party's certificate names it (CN) and its
    role from the file (OU). Keys are written 0600.
    """
    from .hosts import ConfigError

    ca_key = ca_key_path(config)
    written = []
    if force or not os.path.exists(config.ca):
        ca_cert_pem, ca_key_pem = make_ca(days=days)
        written += [write_private(ca_key, ca_key_pem), write_public(config.ca, ca_cert_pem)]
        force = True  # a new CA invalidates every old certificate
    elif not os.path.exists(ca_key):
        raise ConfigError("{}: the CA certificate {} exists but its key {} does not: cannot "
                          "issue certificates (use --force to make a new CA)".format(
                              config.path, config.ca, ca_key))
    else:
        ca_cert_pem = _read(config.ca, "CA certificate")
        ca_key_pem = _read(ca_key, "CA key")
    for party in config.parties:
        if force or not (os.path.exists(party.cert) and os.path.exists(party.key)):
            cert, key = issue(ca_cert_pem, ca_key_pem, party.name, party.role, days=days)
            written += [write_private(party.key, key), write_public(party.cert, cert)]
    return written


def main(argv=None):
    """``privatekeras pki --config HOSTS [--force] [--days N]``: make a hosts file's CA and
    certificates, print what was written and what to copy to each host.
    ``privatekeras pki --hosts H0,H1,H2``: fresh throw-away credentials for workers started
    by hand on this machine (:func:`make_local`)."""
    from .hosts import load

    parser = argparse.ArgumentParser(
        prog="privatekeras pki",
        description="Make the cluster's private CA and a key and certificate for every party "
                    "of a hosts file (only those missing, unless --force).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="hosts file (TOML)")
    which.add_argument("--hosts", help="or: the three 'host:port' API addresses of a cluster "
                                       "on this machine, comma-separated (throw-away CA)")
    parser.add_argument("--force", action="store_true",
                        help="make a new CA and re-issue every certificate")
    parser.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    args = parser.parse_args(argv)
    try:
        if args.hosts is not None:
            directory = make_local([h.strip() for h in args.hosts.split(",")])
            print("wrote {}: ca.crt and a certificate and key for {} (the CA key was not "
                  "kept)".format(directory, ", ".join(LOCAL_NAMES)))
            return 0
        config = load(args.config)
        written = make_pki(config, force=args.force, days=args.days)
    except (ClusterError, ValueError) as exc:
        print("privatekeras pki: error: {}".format(exc), file=sys.stderr)
        return 2
    if not written:
        print("nothing to do: the CA and every party's certificate and key exist (--force "
              "makes a new CA and re-issues them all)")
    for path in written:
        print("wrote", path)
    print("\nCopy to each host the CA certificate and that host's own certificate and key:")
    for party in config.parties:
        print("  {} ({}): {} {} {}".format(party.name, party.role, config.ca, party.cert,
                                          party.key))
    print("Keep the CA key {} offline: whoever holds it can issue certificates the workers "
          "trust.".format(ca_key_path(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
