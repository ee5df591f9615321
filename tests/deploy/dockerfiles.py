"""Small readers for the deployment files: Dockerfiles, compose interpolation, uv.lock.

Used by the static deployment tests; no Docker engine needed.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


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


def interpolate(value: Any, env: dict[str, str], missing: set[str] | None = None) -> Any:
    """Compose's variable interpolation (``${X}``, ``${X:-d}``, ``${X:?e}``, ``$$``) on values."""
    if isinstance(value, dict):
        return {key: interpolate(item, env, missing) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env, missing) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        current = env.get(name)
        empty = current is None or (current == "" and op and op.startswith(":"))
        if op and op.endswith("-"):
            return arg if empty else current
        if op and op.endswith("?"):
            if empty:
                raise KeyError(f"{name}: {arg}")
            return current
        if current is None and missing is not None:
            missing.add(name)
        return current or ""

    return _VAR.sub(replace, value)


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
