"""Certificates made with `cryptography` (privatekeras.deploy.pki): the CA and party
certificates, identities, file modes, the throw-away credentials of a local cluster, the
certificates of a hosts file, and real TLS handshakes with them."""

import datetime
import os
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from netns import hosts_toml
from privatekeras.deploy import pki
from privatekeras.deploy.hosts import ConfigError, load

HOSTS = ["localhost:4000", "localhost:4001", "localhost:4002"]

HOSTS_FILE = hosts_toml({"w0": "10.0.0.1", "w1": "10.0.0.2", "w2": "10.0.0.3"}) + """
[[clients]]
name = "bob"
"""


def _cert(pem):
    return x509.load_pem_x509_certificate(pem)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def ca():
    return pki.make_ca()


def test_the_ca_is_a_p256_ca_that_can_only_sign_certificates(ca):
    cert = _cert(ca[0])
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "privatekeras cluster CA"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    cert.verify_directly_issued_by(cert)  # self-signed
    assert 0 < cert.serial_number < 2 ** 128
    assert cert.serial_number != _cert(pki.make_ca()[0]).serial_number


@pytest.mark.parametrize("name, role", [("worker1", "worker"), ("owner", "owner"),
                                        ("alice.example", "client")])
def test_issued_certificates_chain_to_the_ca_and_carry_name_and_role(ca, name, role):
    cert_pem, key_pem = pki.issue(ca[0], ca[1], name, role)
    cert = _cert(cert_pem)
    cert.verify_directly_issued_by(_cert(ca[0]))  # the CA's signature
    assert cert.issuer == _cert(ca[0]).subject
    assert pki.identity(cert_pem) == (name, role)
    assert cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [name]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert cert.public_key().curve.name == "secp256r1"
    assert b"PRIVATE KEY" in key_pem
    assert cert.not_valid_after_utc <= _cert(ca[0]).not_valid_after_utc


@pytest.mark.parametrize("name", ["", "-worker", ".x", "a b", "x" * 64, "wörker", "a/b", 7,
                                  None])
def test_bad_names_are_refused(ca, name):
    with pytest.raises(ValueError, match="name must be 1-63 letters"):
        pki.issue(ca[0], ca[1], name, "worker")


@pytest.mark.parametrize("role", ["admin", "Worker", "", None])
def test_bad_roles_are_refused(ca, role):
    with pytest.raises(ValueError, match="role must be one of worker, owner, client"):
        pki.issue(ca[0], ca[1], "worker0", role)


def test_a_key_that_is_not_the_cas_is_refused(ca):
    other = pki.make_ca()
    with pytest.raises(ValueError, match="CA key does not belong to the CA certificate"):
        pki.issue(ca[0], other[1], "worker0", "worker")


def _self_signed(attributes):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_identity_needs_a_name_and_a_known_role(ca):
    with pytest.raises(ValueError, match="organisational unit"):
        pki.identity(ca[0])  # the CA has no OU
    with pytest.raises(ValueError, match="common name"):
        pki.identity(_self_signed([(NameOID.ORGANIZATIONAL_UNIT_NAME, "worker")]))
    with pytest.raises(ValueError, match="role .OU. must be one of"):
        pki.identity(_self_signed([(NameOID.COMMON_NAME, "worker0"),
                                   (NameOID.ORGANIZATIONAL_UNIT_NAME, "admin")]))
    with pytest.raises(ValueError, match="not a PEM certificate"):
        pki.identity(b"hello")


def test_identity_is_cached_by_pem_bytes(ca):
    cert_pem, _ = pki.issue(ca[0], ca[1], "worker2", "worker")
    before = pki._identity.cache_info()
    for _ in range(5):
        assert pki.identity(cert_pem) == ("worker2", "worker")
    assert pki.identity(cert_pem.decode()) == ("worker2", "worker")  # str works too
    after = pki._identity.cache_info()
    assert after.misses - before.misses == 1 and after.hits - before.hits == 5
    assert after.maxsize is not None  # bounded


def test_files_are_written_atomically_with_safe_modes(tmp_path):
    key = tmp_path / "sub" / "x.key"
    pki.write_private(key, b"secret")
    assert key.read_bytes() == b"secret" and _mode(key) == 0o600
    assert _mode(key.parent) == 0o700
    crt = tmp_path / "x.crt"
    crt.write_text("old")
    crt.chmod(0o666)
    pki.write_public(crt, b"public")
    assert crt.read_bytes() == b"public" and _mode(crt) == 0o644
    open_key = tmp_path / "y.key"
    open_key.write_text("old")
    open_key.chmod(0o644)
    pki.write_private(open_key, b"secret")  # replaced, not rewritten in place
    assert _mode(open_key) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "x.crt", "y.key"]  # no temps


def _write_party(directory, ca, name, role):
    cert, key = pki.issue(ca[0], ca[1], name, role)
    return (pki.write_public(os.path.join(directory, name + ".crt"), cert),
            pki.write_private(os.path.join(directory, name + ".key"), key))


def test_credentials_from_files(tmp_path, ca):
    ca_path = pki.write_public(tmp_path / "ca.crt", ca[0])
    cert, key = _write_party(tmp_path, ca, "worker0", "worker")
    creds = pki.Credentials.from_files(ca_path, cert, key)
    assert (creds.name, creds.role) == ("worker0", "worker")
    assert creds.ca == ca[0] and creds.cert == open(cert, "rb").read()
    assert "PRIVATE" not in repr(creds) and "key=" not in repr(creds)
    with pytest.raises(Exception):
        creds.name = "worker1"  # frozen


def test_credentials_refuse_a_key_readable_by_others(tmp_path, ca):
    ca_path = pki.write_public(tmp_path / "ca.crt", ca[0])
    cert, key = _write_party(tmp_path, ca, "worker0", "worker")
    os.chmod(key, 0o644)
    with pytest.raises(pki.CredentialsError, match="chmod 600 {}".format(key)):
        pki.Credentials.from_files(ca_path, cert, key)
    os.chmod(key, 0o620)  # group-writable is refused as well
    with pytest.raises(pki.CredentialsError, match="chmod 600"):
        pki.Credentials.from_files(ca_path, cert, key)


def test_credentials_refuse_a_certificate_from_another_ca(tmp_path, ca):
    ca_path = pki.write_public(tmp_path / "ca.crt", ca[0])
    foreign = tmp_path / "foreign"
    cert, key = _write_party(foreign, pki.make_ca(), "worker0", "worker")
    with pytest.raises(pki.CredentialsError, match="is not signed by the CA"):
        pki.Credentials.from_files(ca_path, cert, key)
    # A certificate of the right CA with somebody else's key.
    good_cert, _ = _write_party(tmp_path, ca, "worker1", "worker")
    with pytest.raises(pki.CredentialsError, match="does not belong to certificate"):
        pki.Credentials.from_files(ca_path, good_cert, key)
    with pytest.raises(pki.CredentialsError, match="does not exist"):
        pki.Credentials.from_files(ca_path, tmp_path / "nobody.crt", key)


# -- throw-away credentials of a local cluster --------------------------------------------------
@pytest.fixture
def runtime(tmp_path, monkeypatch):
    base = tmp_path / "runtime"
    monkeypatch.setenv("PRIVATEKERAS_RUNTIME_DIR", str(base))
    return base


def test_local_credentials_lifecycle(runtime):
    with pytest.raises(pki.CredentialsError) as info:
        pki.load_local(HOSTS, "worker0")
    msg = str(info.value)
    assert "not started by this user on this machine" in msg
    assert "Cluster.start()" in msg and "pk_start()" in msg and "Cluster.from_config" in msg

    directory = pki.make_local(HOSTS)
    assert directory == pki.local_dir(HOSTS)
    assert os.path.dirname(directory) == str(runtime)
    assert len(os.path.basename(directory)) == 16
    assert _mode(runtime) == 0o700 and _mode(directory) == 0o700
    names = ["worker0", "worker1", "worker2", "owner", "client"]
    assert sorted(os.listdir(directory)) == sorted(
        ["ca.crt"] + [n + ".crt" for n in names] + [n + ".key" for n in names])
    ca_cert = _cert(open(os.path.join(directory, "ca.crt"), "rb").read())
    ca_public = ca_cert.public_key().public_numbers()
    for name in names:
        key_path = os.path.join(directory, name + ".key")
        assert _mode(key_path) == 0o600
        creds = pki.load_local(HOSTS, name)
        assert creds.name == name
        assert creds.role == ("worker" if name.startswith("worker") else name)
        _cert(creds.cert).verify_directly_issued_by(ca_cert)
        # No file holds the CA's key: every key on disk is a party's own.
        key = serialization.load_pem_private_key(creds.key, None)
        assert key.public_key().public_numbers() != ca_public
    with pytest.raises(ValueError, match="name must be one of"):
        pki.load_local(HOSTS, "alice")

    # Another cluster gets its own directory; a fresh start makes a fresh CA.
    other = ["localhost:5000", "localhost:5001", "localhost:5002"]
    assert pki.local_dir(other) != directory
    first_ca = pki.load_local(HOSTS, "worker0").ca
    pki.make_local(HOSTS)
    assert pki.load_local(HOSTS, "worker0").ca != first_ca

    pki.remove_local(HOSTS)
    assert not os.path.exists(directory)
    with pytest.raises(pki.CredentialsError, match="Cluster.start()"):
        pki.load_local(HOSTS, "owner")
    pki.remove_local(HOSTS)  # nothing to remove: no error


def test_pki_cli_makes_local_credentials(runtime, capsys):
    assert pki.main(["--hosts", " localhost:4000, localhost:4001,localhost:4002"]) == 0
    directory = pki.local_dir(HOSTS)
    assert "wrote {}: ca.crt".format(directory) in capsys.readouterr().out
    assert pki.load_local(HOSTS, "worker2").role == "worker"
    assert pki.main(["--hosts", "localhost:4000,localhost:4001"]) == 2
    assert "3 'host:port' strings" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --config or --hosts, not both
        pki.main(["--hosts", ",".join(HOSTS), "--config", "x.toml"])


def test_local_credentials_refuse_a_base_dir_others_can_reach(runtime):
    runtime.mkdir()
    runtime.chmod(0o770)
    with pytest.raises(pki.CredentialsError,
                       match="accessible by other users .mode 770.: chmod 700 {}".format(runtime)):
        pki.make_local(HOSTS)
    runtime.chmod(0o700)
    directory = pki.make_local(HOSTS)
    os.chmod(directory, 0o755)  # loosened afterwards: refused when read back
    with pytest.raises(pki.CredentialsError, match="chmod 700 {}".format(directory)):
        pki.load_local(HOSTS, "worker0")
    with pytest.raises(pki.CredentialsError, match="chmod 700"):
        pki.make_local(HOSTS)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_local_credentials_refuse_a_base_dir_of_another_user(runtime):
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 65534, 65534)
    with pytest.raises(pki.CredentialsError, match="belongs to uid 65534, not to this user"):
        pki.make_local(HOSTS)


def test_runtime_base_is_per_user_and_not_a_fixed_tmp_name(tmp_path, monkeypatch):
    monkeypatch.delenv("PRIVATEKERAS_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert pki.runtime_base() == str(xdg / "privatekeras")
    fallback = str(tmp_path / "home" / ".cache" / "privatekeras" / "run")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert pki.runtime_base() == fallback
    if os.geteuid() == 0:  # an XDG_RUNTIME_DIR of somebody else is not used
        os.chown(xdg, 65534, 65534)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
        assert pki.runtime_base() == fallback
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert pki.runtime_base() == fallback
    directory = pki.make_local(HOSTS)
    assert directory.startswith(fallback)
    assert _mode(fallback) == 0o700 and _mode(os.path.dirname(fallback)) == 0o700


# -- the certificates of a hosts file -----------------------------------------------------------
def test_make_pki_for_a_hosts_file(tmp_path, capsys):
    path = tmp_path / "hosts.toml"
    path.write_text(HOSTS_FILE)
    config = load(path)
    written = pki.make_pki(config)
    ca_key = str(tmp_path / "pki" / "ca.key")
    assert len(written) == 2 + 2 * 6 and ca_key in written and config.ca in written
    for f in written:
        assert _mode(f) == (0o600 if f.endswith(".key") else 0o644), f
    ca_cert = _cert(open(config.ca, "rb").read())
    for party in config.parties:
        cert_pem = open(party.cert, "rb").read()
        _cert(cert_pem).verify_directly_issued_by(ca_cert)
        assert pki.identity(cert_pem) == (party.name, party.role)
        assert config.credentials(party.name).role == party.role
    assert pki.make_pki(config) == []  # idempotent

    os.unlink(config.party("bob").key)  # only what is missing is issued
    assert pki.make_pki(config) == [config.party("bob").key, config.party("bob").cert]
    assert config.credentials("bob").name == "bob"

    old_ca = open(config.ca, "rb").read()
    assert len(pki.make_pki(config, force=True)) == 2 + 2 * 6  # a new CA re-issues everything
    assert open(config.ca, "rb").read() != old_ca
    for party in config.parties:
        assert config.credentials(party.name).name == party.name

    assert pki.main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "Keep the CA key {} offline".format(ca_key) in out
    assert "worker1 (worker): {} {} {}".format(config.ca, config.party("worker1").cert,
                                               config.party("worker1").key) in out
    assert pki.main(["--config", str(path), "--force", "--days", "30"]) == 0
    out = capsys.readouterr().out
    assert out.count("wrote ") == 2 + 2 * 6
    assert _cert(open(config.ca, "rb").read()).not_valid_after_utc < \
        datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=31)

    os.unlink(ca_key)
    with pytest.raises(ConfigError, match="exists but its key .* does not: .*use --force"):
        pki.make_pki(config)
    assert pki.main(["--config", str(path)]) == 2
    assert "privatekeras pki: error:" in capsys.readouterr().err
    assert pki.main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- real TLS handshakes with the issued certificates ----------------------------------------------
def _handshake(tmp_path, ca, server, client, client_ca=None, server_name=None):
    """TLS 1.3 over a socket pair: server ``server`` requires a client certificate of ``ca``;
    the client presents ``client`` and checks the server's name. Returns (server result,
    client result): the peer's identity, or the exception."""
    ca_path = pki.write_public(tmp_path / "ca.crt", ca[0])
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.load_verify_locations(ca_path)
    sctx.load_cert_chain(*_write_party(tmp_path / "s", ca, *server))
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cctx.load_verify_locations(ca_path)
    cctx.load_cert_chain(*_write_party(tmp_path / "c", client_ca or ca, *client))
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    results = {}

    def serve():
        try:
            with sctx.wrap_socket(a, server_side=True) as s:
                pem = ssl.DER_cert_to_PEM_cert(s.getpeercert(binary_form=True))
                results["server"] = pki.identity(pem.encode())
                s.sendall(s.recv(100).upper())
        except (OSError, ssl.SSLError) as exc:
            results["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with cctx.wrap_socket(b, server_hostname=server_name or server[0]) as c:
            pem = ssl.DER_cert_to_PEM_cert(c.getpeercert(binary_form=True))
            c.sendall(b"ping")
            reply = c.recv(100)
            results["client"] = pki.identity(pem.encode()) if reply == b"PING" else \
                ConnectionError("no reply: {!r}".format(reply))
    except (OSError, ssl.SSLError) as exc:
        results["client"] = exc
    thread.join(20)
    return results["server"], results["client"]


def test_tls_handshake_between_two_issued_certificates(tmp_path, ca):
    server, client = _handshake(tmp_path, ca, ("worker0", "worker"), ("worker1", "worker"))
    assert server == ("worker1", "worker")  # the server learns who called
    assert client == ("worker0", "worker")  # and the client checked whom it reached


def test_tls_handshake_with_a_foreign_certificate_fails(tmp_path, ca):
    server, client = _handshake(tmp_path, ca, ("worker0", "worker"), ("worker1", "worker"),
                                client_ca=pki.make_ca())
    assert isinstance(server, ssl.SSLError) and "certificate verify failed" in str(server)
    assert isinstance(client, (OSError, ssl.SSLError))


def test_tls_client_checks_the_servers_name(tmp_path, ca):
    server, client = _handshake(tmp_path, ca, ("worker0", "worker"), ("owner", "owner"),
                                server_name="worker2")
    assert isinstance(client, ssl.SSLCertVerificationError)
    assert "worker2" in str(client)
