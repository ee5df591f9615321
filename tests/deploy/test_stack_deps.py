"""A failed install of the stack's Debian packages fails only the deploy tests, with its reason.

``make test`` runs ``install_stack_deps.sh`` first (PostgreSQL's server, docker-compose,
redis-server); when it cannot install (no root, no apt, a broken mirror) the suite
still runs, and the deploy tests, which need them, fail naming what went wrong
instead of "not found".
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.deploy.dockerfiles import compose_bin
from tests.deploy.stack import REPO, postgres_bin


def _failing_apt(folder):
    """``apt-get`` that fails as a machine without a reachable mirror does."""
    folder.mkdir()
    apt = folder / "apt-get"
    apt.write_text(
        "#!/bin/sh\necho 'E: Unable to locate package postgresql-common' >&2\nexit 100\n"
    )
    apt.chmod(apt.stat().st_mode | stat.S_IEXEC)
    sudo = folder / "sudo"  # when the test runs as a user: run the command itself
    sudo.write_text('#!/bin/sh\nexec "$@"\n')
    sudo.chmod(sudo.stat().st_mode | stat.S_IEXEC)
    return folder


@pytest.fixture
def failed_install(tmp_path, monkeypatch):
    bin_dir = _failing_apt(tmp_path / "bin")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "POSTGRES_BINDIRS": str(tmp_path / "no-postgres"),
        "STACK_DEPS_LOG": str(tmp_path / "stack-deps-failed.log"),
    }
    proc = subprocess.run(
        ["make", "-s", "--no-print-directory", "stack-deps"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    for name in ("POSTGRES_BINDIRS", "STACK_DEPS_LOG"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("PATH", env["PATH"])
    return proc, tmp_path / "stack-deps-failed.log"


def test_make_goes_on_after_a_failed_install_and_keeps_the_reason(failed_install):
    proc, log = failed_install
    assert proc.returncode == 0, proc.stderr  # `make test` goes on to pytest
    assert "only tests/deploy will fail" in proc.stderr
    assert "Unable to locate package postgresql-common" in log.read_text()


def test_the_deploy_tests_then_fail_with_that_reason(failed_install):
    with pytest.raises(RuntimeError) as error:
        postgres_bin()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("PostgreSQL server binaries not found; the install failed: ")
    assert "Unable to locate package postgresql-common" in message


def test_the_compose_tests_then_fail_with_that_reason(failed_install, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no docker-compose there
    compose_bin.cache_clear()
    try:
        with pytest.raises(RuntimeError) as error:
            compose_bin()
    finally:
        compose_bin.cache_clear()
    message = str(error.value)
    assert message.startswith("docker-compose not found; the install failed: ")
    assert "Unable to locate package postgresql-common" in message


def _executables(folder, *names):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(0o755)
    return folder


def test_the_install_asks_apt_for_each_missing_package_and_starts_no_service(tmp_path):
    """PostgreSQL there, docker-compose and redis-server not: apt is asked for those two,
    with service starts vetoed (policy-rc.d) during the install only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text(
        '#!/bin/sh\necho "$*" >> "$APT_LOG"\n'
        'if [ -x "$STACK_DEPS_POLICY_RC_D" ]; then\n'
        '  "$STACK_DEPS_POLICY_RC_D" redis-server start; echo "policy $?" >> "$APT_LOG"\nfi\n'
        '[ "$1" = update ] && exit 0\n'
        "echo 'E: Unable to locate package redis-server' >&2\nexit 100\n"
    )
    apt.chmod(0o755)
    sudo = bin_dir / "sudo"
    sudo.write_text('#!/bin/sh\nexec "$@"\n')
    sudo.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "APT_LOG": str(tmp_path / "apt.log"),
        "POSTGRES_BINDIRS": str(_executables(tmp_path / "pg", "initdb")),
        "STACK_DEPS_PATH": str(tmp_path / "nothing"),
        "STACK_DEPS_POLICY_RC_D": str(tmp_path / "policy-rc.d"),
        "STACK_DEPS_LOG": str(tmp_path / "stack-deps-failed.log"),
    }
    proc = subprocess.run(
        ["bash", str(REPO / "tests/deploy/install_stack_deps.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 100
    calls = (tmp_path / "apt.log").read_text().splitlines()
    install = [c for c in calls if c.startswith("install")]
    assert install and install[0].endswith(" docker-compose redis-server")
    assert "postgresql" not in " ".join(calls)
    assert calls[calls.index(install[0]) + 1] == "policy 101"  # no service starts
    assert not (tmp_path / "policy-rc.d").exists()  # and the veto is gone again
    log = (tmp_path / "stack-deps-failed.log").read_text()
    assert "Unable to locate package redis-server" in log
    assert "installing docker-compose redis-server" in log


def test_a_later_successful_install_forgets_the_failure(failed_install, tmp_path):
    proc, log = failed_install
    assert log.exists()
    _executables(tmp_path / "no-postgres", "initdb")
    tools = _executables(tmp_path / "tools", "docker-compose", "redis-server")
    again = subprocess.run(
        ["bash", str(REPO / "tests/deploy/install_stack_deps.sh")],
        env={**os.environ, "STACK_DEPS_PATH": str(tools)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert not log.exists()
