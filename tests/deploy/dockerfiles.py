"""Readers for the deployment files: Dockerfiles, uv.lock, and the compose files as a
real compose implementation resolves them.

The compose files are read by Debian 12's ``docker-compose`` (1.29; installed by
tests/deploy/install_stack_deps.sh): ``docker-compose config`` interpolates the
variables, merges anchors and override files, validates and prints the resolved
configuration, with no Docker daemon (the runner points it at a socket that does not
exist). 1.29 predates the Compose specification's top-level ``name``, which the
stack sets: the runner hands it the file without that one line and passes the
same name as ``--project-name`` (``test_compose_config.py`` checks that this line is
all 1.29 refuses). The Dockerfiles are linted by hadolint (test_dockerfile_lint.py).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.deploy.stack import install_failure

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
CONSOLE = DOCKER / "compose.console.yaml"  # the MinIO console, on request
ENV_EXAMPLE = DOCKER / ".env.example"
# A socket that does not exist: any call `docker-compose config` made to a daemon fails.
NO_DAEMON = "unix:///nonexistent/docker.sock"
# Setting names that hold secrets (or keys): never a default, never a literal.
SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|CREDENTIAL|PRIVATE|FERNET|ACCESS_KEY|API_KEY", re.I)
TOP_LEVEL_NAME = re.compile(r"^name:[ \t]*(\S+)[ \t]*\n", re.MULTILINE)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, value = buffer.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        buffer = ""
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The build stages, each starting with its FROM."""
    found: list[list[Instruction]] = []
    for item in instructions:
        if item.keyword == "FROM":
            found.append([])
        if found:
            found[-1].append(item)
    return found


def from_image(instruction: Instruction) -> tuple[str, str | None]:
    """(image, alias) of a FROM, options such as --platform dropped."""
    words = [w for w in instruction.value.split() if not w.startswith("--")]
    alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
    return words[0], alias


def pinned(image: str) -> bool:
    """True for ``name:<version>`` (a digit in the tag, not latest) or ``name@sha256:...``."""
    if "@sha256:" in image:
        return True
    if "$" in image:
        return False
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return False
    return tag != "latest" and any(ch.isdigit() for ch in tag)


def flags(value: str) -> dict[str, str]:
    return dict((m.group(1), m.group(2)) for m in re.finditer(r"--([a-z-]+)=(\S+)", value))


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for item in instructions:
        if item.keyword == "ARG" and "=" in item.value:
            name, _, value = item.value.partition("=")
            defaults[name.strip()] = value.strip().strip("\"'")
    return defaults


def env_names(instructions: list[Instruction]) -> list[str]:
    names = []
    for item in instructions:
        if item.keyword == "ENV":
            names += re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", item.value)
        elif item.keyword == "ARG":
            names.append(item.value.partition("=")[0].strip())
    return names


def lock_versions() -> dict[str, str]:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return {package["name"]: package.get("version", "") for package in lock["package"]}


_VAR = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
)


def variables(text: str) -> set[str]:
    """Every variable a compose file reads (``$$`` escapes are the container's, not ours)."""
    text = text.replace("$$", "")
    return {m.group(1) or m.group(4) for m in _VAR.finditer(text) if m.group(0) != "$$"}


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def env_text(drop: Sequence[str] = (), **values: str) -> str:
    """docker/.env.example's text with the ``drop`` lines removed and ``values`` set."""
    lines, seen = [], set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        key = line.partition("=")[0].strip() if not line.lstrip().startswith("#") else ""
        if key in drop:
            continue
        if key in values:
            line = f"{key}={values[key]}"
            seen.add(key)
        lines.append(line)
    lines += [f"{key}={value}" for key, value in values.items() if key not in seen]
    return "\n".join(lines) + "\n"


@functools.cache
def compose_bin() -> str:
    """Debian 12's ``docker-compose`` 1.29, or a RuntimeError saying why it is missing."""
    found = shutil.which("docker-compose")
    if not found:
        failed = install_failure()
        reason = (
            f"the install failed: {failed}"
            if failed
            else "run `bash tests/deploy/install_stack_deps.sh` (installs Debian's docker-compose)"
        )
        raise RuntimeError(f"docker-compose not found; {reason}")
    version = subprocess.run(
        [found, "version", "--short"], capture_output=True, text=True, timeout=60
    ).stdout.strip()
    if not version.startswith("1.29."):
        raise RuntimeError(
            f"{found} is docker-compose {version!r}; tests/deploy reads its `config` output "
            "in the format of Debian 12's docker-compose 1.29 (install_stack_deps.sh)"
        )
    return found


def compose_run(
    *args: str,
    env: str | None = None,
    overrides: Sequence[Path] = (),
    text: str | None = None,
    keep_name: bool = False,
) -> subprocess.CompletedProcess:
    """``docker-compose <args>`` on docker/compose.yaml (or ``text`` in its place) plus
    ``overrides``, with docker/.env.example (or ``env``, an env file's text), relative
    paths resolved from docker/ as for the real file, and no daemon to talk to."""
    text = COMPOSE.read_text() if text is None else text
    found = TOP_LEVEL_NAME.search(text)
    with tempfile.TemporaryDirectory(prefix="compose-") as tmp:
        base = Path(tmp) / "compose.yaml"
        base.write_text(text if keep_name else TOP_LEVEL_NAME.sub("", text, count=1))
        env_file = ENV_EXAMPLE
        if env is not None:
            env_file = Path(tmp) / "env"
            env_file.write_text(env)
        command = [compose_bin(), "--env-file", str(env_file), "--project-directory", str(DOCKER)]
        command += ["--project-name", found.group(1) if found else "unnamed", "--file", str(base)]
        for path in overrides:
            command += ["--file", str(path)]
        # Nothing from the caller's environment: a shell's variable would win over the file.
        isolated = {"PATH": os.environ["PATH"], "HOME": tmp, "DOCKER_HOST": NO_DAEMON}
        return subprocess.run(
            [*command, *args], cwd=tmp, env=isolated, capture_output=True, text=True, timeout=120
        )


@functools.cache
def _config(env: str | None, overrides: tuple[Path, ...]) -> subprocess.CompletedProcess:
    return compose_run("config", env=env, overrides=overrides)


def resolved(env: str | None = None, overrides: Sequence[Path] = ()) -> dict:
    """The configuration ``docker-compose config`` resolves (a fresh copy on each call).
    1.29 prints ``$$`` escapes as written (``$$VAR``): the container sees ``$VAR``."""
    done = _config(env, tuple(overrides))
    assert done.returncode == 0, f"docker-compose config failed: {done.stderr}"
    return yaml.safe_load(done.stdout)


def config_warnings(env: str | None = None, overrides: Sequence[Path] = ()) -> str:
    """What ``docker-compose config`` printed besides the configuration (e.g. unset variables)."""
    return _config(env, tuple(overrides)).stderr
