"""The hosts file (privatekeras.deploy.hosts): the example loads, and every mistake gives an
error naming the file and the field."""

import os
import shutil

import pytest

from netns import hosts_toml
from conftest import ROOT
from privatekeras.deploy import pki
from privatekeras.deploy.hosts import ConfigError, load

EXAMPLE = os.path.join(ROOT, "inst", "examples", "hosts.toml")

GOOD = hosts_toml({"w0": "10.0.0.1", "w1": "10.0.0.2", "w2": "10.0.0.3"})


def test_the_example_loads():
    config = load(EXAMPLE)
    examples = os.path.dirname(EXAMPLE)
    assert config.path == EXAMPLE
    assert config.ca == os.path.join(examples, "pki", "ca.crt")
    assert [w.name for w in config.workers] == ["worker0", "worker1", "worker2"]
    assert [w.index for w in config.workers] == [0, 1, 2]
    assert config.owner.name == "owner" and config.owner.role == "owner"
    assert [c.name for c in config.clients] == ["alice"]
    assert [p.name for p in config.parties] == ["worker0", "worker1", "worker2", "owner",
                                                "alice"]
    assert config.api_addresses == ["10.0.0.1:5000", "10.0.0.2:5000", "10.0.0.3:5000"]
    assert config.compute_addresses == ["127.0.0.1:4000", "127.0.0.1:4002", "127.0.0.1:4004"]
    # mesh_port is not given: compute_port + 1
    assert config.mesh_addresses == ["127.0.0.1:4001", "127.0.0.1:4003", "127.0.0.1:4005"]
    w1 = config.party("worker1")
    assert w1.role == "worker" and w1.api == ("10.0.0.2", 5000) and w1.link == ("10.0.0.2", 7000)
    assert w1.api_listen == w1.api and w1.link_listen == w1.link and w1.compute_port == 4002
    assert w1.mesh_port == 4003 and w1.mesh_address == "127.0.0.1:4003"
    assert "compute_port=4002 mesh_port=4003" in repr(w1)
    assert w1.cert == os.path.join(examples, "pki", "worker1.crt")
    assert w1.key == os.path.join(examples, "pki", "worker1.key")
    alice = config.party("alice")
    assert alice.role == "client" and alice.index is None
    assert alice.api is None and alice.link is None and alice.compute_port is None
    assert alice.api_address is None and alice.mesh_port is None and alice.mesh_address is None


def test_mesh_port_defaults_to_the_port_after_the_compute_port_or_is_given(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text(GOOD.replace("compute_port = 4002", "compute_port = 4002\nmesh_port = 4100"))
    config = load(path)
    assert [w.compute_port for w in config.workers] == [4000, 4002, 4004]
    assert [w.mesh_port for w in config.workers] == [4001, 4100, 4005]
    assert config.mesh_addresses == ["127.0.0.1:4001", "127.0.0.1:4100", "127.0.0.1:4005"]
    # Consecutive compute ports need every mesh_port given (the defaults would clash).
    path.write_text(GOOD.replace("compute_port = 4002", "compute_port = 4001")
                        .replace("compute_port = 4004", "compute_port = 4002")
                        .replace("compute_port = 4000", "compute_port = 4000\nmesh_port = 5100")
                        .replace("compute_port = 4001", "compute_port = 4001\nmesh_port = 5101")
                        .replace("compute_port = 4002", "compute_port = 4002\nmesh_port = 5102"))
    config = load(path)
    assert config.compute_addresses == ["127.0.0.1:4000", "127.0.0.1:4001", "127.0.0.1:4002"]
    assert config.mesh_addresses == ["127.0.0.1:5100", "127.0.0.1:5101", "127.0.0.1:5102"]


def test_party_lookup_names_the_known_parties():
    config = load(EXAMPLE)
    with pytest.raises(ConfigError, match="no party named 'bob' .known: worker0, worker1, "
                                          "worker2, owner, alice."):
        config.party("bob")
    with pytest.raises(ConfigError, match="'owner' is the owner, not a worker"):
        config.worker("owner")


def test_listen_addresses_ipv6_and_paths(tmp_path):
    text = GOOD.replace('api = "10.0.0.1:5000"', 'api = "[fd00::1]:5000"\n'
                                                  'api_listen = "[::]:5000"') \
               .replace('link = "10.0.0.1:7000"', 'link = "w0.example.org:7000"\n'
                                                  'link_listen = "0.0.0.0:7000"\n'
                                                  'cert = "/etc/pk/w0.crt"\nkey = "keys/w0.key"') \
               .replace('ca = "pki/ca.crt"', 'ca = "pki/ca.crt"\ncerts = "certs"')
    path = tmp_path / "hosts.toml"
    path.write_text(text)
    w0 = load(path).workers[0]
    assert w0.api == ("fd00::1", 5000) and w0.api_address == "[fd00::1]:5000"
    assert w0.api_listen == ("::", 5000)
    assert w0.link == ("w0.example.org", 7000) and w0.link_listen == ("0.0.0.0", 7000)
    assert w0.cert == "/etc/pk/w0.crt" and w0.key == str(tmp_path / "keys" / "w0.key")
    assert load(path).workers[1].cert == str(tmp_path / "certs" / "worker1.crt")


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t.replace("compute_port = 4002", 'compute_port = "4002"'),
     "workers[1].compute_port must be an integer in 1..65535, got '4002'"),
    (lambda t: t.replace("compute_port = 4002", "compute_port = 70000"),
     "workers[1].compute_port must be an integer in 1..65535, got 70000"),
    (lambda t: t.replace("compute_port = 4002", "compute_port = true"),
     "workers[1].compute_port must be an integer in 1..65535, got True"),
    (lambda t: t.replace('api = "10.0.0.2:5000"', 'api = "10.0.0.2:0"'),
     "workers[1].api must be 'host:port' with a port in 1..65535, got '10.0.0.2:0'"),
    (lambda t: t.replace('link = "10.0.0.3:7000"', 'link = "10.0.0.3"'),
     "workers[2].link must be 'host:port' with a port in 1..65535, got '10.0.0.3'"),
    (lambda t: t.replace('link = "10.0.0.3:7000"', 'link = "fd00::3:7000"'),
     "workers[2].link: write an IPv6 address in brackets, '[fd00::3]:7000'"),
    (lambda t: t.replace('link = "10.0.0.1:7000"\n', ""),
     "workers[0].link is missing (the 'host:port' where the other workers reach"),
    (lambda t: t.replace('api = "10.0.0.2:5000"\n', ""),
     "workers[1].api is missing (the 'host:port' where owners and clients reach"),
    (lambda t: t.replace("compute_port = 4004\n", ""),
     "workers[2].compute_port is missing (this worker's TensorFlow port on 127.0.0.1"),
    (lambda t: t.replace('name = "worker1"\n', ""), "workers[1].name is missing"),
    (lambda t: t.replace('ca = "pki/ca.crt"', ""), "cluster.ca is missing"),
    (lambda t: t.replace("[cluster]\n", "").replace('ca = "pki/ca.crt"', ""),
     "[cluster] is missing"),
    (lambda t: t.replace('name = "alice"', 'name = "worker0"'),
     "party name 'worker0' is used twice (workers[0] and clients[0])"),
    (lambda t: t.replace('name = "owner"', 'name = "worker2"'),
     "party name 'worker2' is used twice (workers[2] and owner)"),
    (lambda t: t.replace("compute_port = 4004", "compute_port = 4000"),
     "workers[2].compute_port 4000 is also workers[0].compute_port: the three compute ports "
     "and the three mesh ports must all be distinct (every worker host binds all six on "
     "127.0.0.1)"),
    (lambda t: t.replace("compute_port = 4002", "compute_port = 4002\nmesh_port = 4001"),
     "workers[1].mesh_port 4001 is also workers[0].mesh_port: the three compute ports and the "
     "three mesh ports must all be distinct"),
    (lambda t: t.replace("compute_port = 4002", "compute_port = 4001"),
     "workers[0].mesh_port 4001 (compute_port + 1, the default) is also "
     "workers[1].compute_port: the three compute ports and the three mesh ports must all be "
     "distinct (every worker host binds all six on 127.0.0.1); give mesh_port, or leave gaps "
     "between the compute ports"),
    (lambda t: t.replace("compute_port = 4004", "compute_port = 4004\nmesh_port = 4000"),
     "workers[2].mesh_port 4000 is also workers[0].compute_port"),
    (lambda t: t.replace("compute_port = 4000", "compute_port = 4000\nmesh_port = 4000"),
     "workers[0].mesh_port 4000 is also workers[0].compute_port"),
    (lambda t: t.replace("compute_port = 4002", "compute_port = 4002\nmesh_port = 0"),
     "workers[1].mesh_port must be an integer in 1..65535, got 0"),
    (lambda t: t.replace("compute_port = 4004", "compute_port = 65535"),
     "workers[2].mesh_port is missing and its default, compute_port + 1, is not a port"),
    (lambda t: t.replace('link = "10.0.0.1:7000"', 'link = "127.0.0.1:7000"'),
     "workers[0].link 127.0.0.1:7000 is a loopback address: the other hosts cannot reach it"),
    (lambda t: t.replace('link = "10.0.0.1:7000"', 'link = "[::1]:7000"'),
     "workers[0].link [::1]:7000 is a loopback address"),
    (lambda t: t.replace('api = "10.0.0.2:5000"', 'api = "localhost:5000"'),
     "workers[1].api localhost:5000 is a loopback name"),
    (lambda t: t.replace('link = "10.0.0.2:7000"', 'link = "0.0.0.0:7000"'),
     "workers[1].link 0.0.0.0:7000 is a wildcard, not an address other hosts can connect to: "
     "give this host's address, and put the wildcard in workers[1].link_listen"),
    (lambda t: t.replace('link = "10.0.0.2:7000"', 'link = "10.0.0.2:7000"\n'
                                                   'link_listen = "0.0.0.0:4000"'),
     "workers[1].link_listen 0.0.0.0:4000 takes port 4000, which is workers[0].compute_port"),
    (lambda t: t.replace('link = "10.0.0.2:7000"', 'link = "10.0.0.2:7000"\n'
                                                   'link_listen = "127.0.0.1:4005"'),
     "workers[1].link_listen 127.0.0.1:4005 takes port 4005, which is workers[2].mesh_port: "
     "every worker host binds all three compute ports and all three mesh ports on 127.0.0.1"),
    (lambda t: t.replace('api = "10.0.0.1:5000"', 'api = "10.0.0.1:5000"\n'
                                                  'api_listen = "[::]:4003"'),
     "workers[0].api_listen [::]:4003 takes port 4003, which is workers[1].mesh_port"),
    (lambda t: t.replace('api = "10.0.0.2:5000"', 'api = "10.0.0.2:7000"'),
     "workers[1]: the API and the link cannot both listen on 10.0.0.2:7000"),
    (lambda t: t.replace('link = "10.0.0.1:7000"', 'link = "10.0.0.1:7000"\ntunnel = "x"'),
     "workers[0]: unknown field(s) tunnel (known: name, api, link, compute_port"),
    (lambda t: t.replace('ca = "pki/ca.crt"', 'ca = "pki/ca.crt"\njob = "pk"'),
     "unknown field(s) cluster.job (known: ca, certs)"),
    (lambda t: t + "[extra]\nx = 1\n",
     "unknown section(s) extra (known: cluster, workers, owner, clients)"),
    (lambda t: t.replace('name = "owner"', 'name = "owner"\ncompute_port = 4100'),
     "owner.compute_port: only workers have api, link, compute_port, mesh_port, api_listen, "
     "link_listen (the owner connects"),
    (lambda t: t.replace('name = "alice"', 'name = "alice"\nmesh_port = 4100'),
     "clients[0].mesh_port: only workers have"),
    (lambda t: t.replace('name = "alice"', 'name = "alice"\napi = "10.0.0.9:5000"'),
     "clients[0].api: only workers have"),
    (lambda t: t.replace('name = "alice"', 'name = "alice"\ncolour = "blue"'),
     "clients[0]: unknown field(s) colour (known: name, cert, key)"),
    (lambda t: t.replace('name = "alice"', 'name = "al ice"'),
     "clients[0].name must be 1-63 letters, digits, '.' or '-'"),
    (lambda t: t[:t.index('[[workers]]\nname = "worker2"')],
     "[[workers]] must list exactly 3 workers (three-party computation), got 2"),
    (lambda t: t.replace('ca = "pki/ca.crt"', "ca = 3"),
     "cluster.ca must be a file path string, got 3"),
    (lambda t: t + "[[workers]\n", "is not valid TOML"),
])
def test_bad_hosts_files_name_the_field(tmp_path, edit, fragment):
    path = tmp_path / "hosts.toml"
    path.write_text(edit(GOOD))
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(str(path)), message  # names the file ...
    assert fragment in message, message  # ... and the field


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="hosts file .*nope.toml does not exist"):
        load(tmp_path / "nope.toml")


def test_credentials_come_from_the_files_and_must_name_the_party(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text(GOOD)
    config = load(path)
    with pytest.raises(pki.CredentialsError, match="does not exist .make the cluster's "
                                                   "certificates with `privatekeras pki"):
        config.credentials("worker0")
    pki.make_pki(config)
    creds = config.credentials("worker0")
    assert (creds.name, creds.role) == ("worker0", "worker")
    assert creds.ca == open(config.ca, "rb").read()
    # alice's certificate and key copied in as worker1's: refused, naming both.
    w1, alice = config.party("worker1"), config.party("alice")
    shutil.copy(alice.cert, w1.cert)
    shutil.copy(alice.key, w1.key)
    with pytest.raises(pki.CredentialsError, match="is for 'alice' .client., but the hosts "
                                                   "file lists it for 'worker1' .worker."):
        config.credentials("worker1")
