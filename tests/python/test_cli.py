"""The `privatekeras` command (privatekeras.cli): one console command with subcommands for the
worker, the certificates, the links and the kernels, as installed by pip and as
`python -m privatekeras`. Real processes; nothing is mocked."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, child_env

SUBCOMMANDS = ("worker", "pki", "links", "kernels")


def run(*args, exe=None):
    cmd = ([exe] if exe else [sys.executable, "-m", "privatekeras"]) + list(args)
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    out = run("--help")
    assert out.returncode == 0, out.stderr
    for name in SUBCOMMANDS:
        assert "\n  {} ".format(name) in out.stdout, out.stdout
    bare = run()
    assert bare.returncode == 2 and "usage: privatekeras COMMAND" in bare.stdout
    unknown = run("serve-everything")
    assert unknown.returncode == 2
    assert "unknown command 'serve-everything'" in unknown.stderr


def test_version():
    from privatekeras import __version__

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == "privatekeras " + __version__


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_its_own_help(name):
    out = run(name, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_kernels_check_and_path_agree():
    path = run("kernels", "path")
    check = run("kernels", "check")
    assert path.returncode == 0
    assert check.returncode == 0, check.stdout  # make setup built them
    assert check.stdout.strip() == path.stdout.strip()
    assert os.path.exists(check.stdout.strip())


def test_pki_through_the_command_writes_a_hosts_files_certificates(tmp_path):
    shutil.copy(os.path.join(ROOT, "inst", "examples", "hosts.toml"), tmp_path / "hosts.toml")
    out = run("pki", "--config", str(tmp_path / "hosts.toml"))
    assert out.returncode == 0, out.stderr
    for name in ("ca.crt", "worker0.crt", "worker0.key", "owner.crt", "alice.key"):
        assert (tmp_path / "pki" / name).exists(), name
    assert "Keep the CA key" in out.stdout
    again = run("pki", "--config", str(tmp_path / "hosts.toml"))
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_the_installed_console_script_is_the_same_command():
    exe = os.path.join(os.path.dirname(sys.executable), "privatekeras")
    if not os.path.exists(exe):
        pytest.skip("the privatekeras console script is not installed in this environment "
                    "(make setup installs it with pip install -e .)")
    out = run("--help", exe=exe)
    assert out.returncode == 0
    assert all("\n  {} ".format(name) in out.stdout for name in SUBCOMMANDS)
