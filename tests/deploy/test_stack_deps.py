"""A failed PostgreSQL install fails only the deploy tests, with its reason.

``make test`` runs ``install_stack_deps.sh`` first; when it cannot install (no
root, no apt, a broken mirror) the suite still runs, and the deploy tests,
which need the server, fail naming what went wrong instead of "not found".
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

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


def test_a_later_successful_install_forgets_the_failure(failed_install, tmp_path):
    proc, log = failed_install
    assert log.exists()
    (tmp_path / "no-postgres").mkdir()
    initdb = tmp_path / "no-postgres" / "initdb"
    initdb.write_text("#!/bin/sh\n")
    initdb.chmod(0o755)
    again = subprocess.run(
        ["bash", str(REPO / "tests/deploy/install_stack_deps.sh")],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert not log.exists()
