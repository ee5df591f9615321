"""Kubernetes manifests checked against the API's own schema, for one pinned release.

The schemas are the JSON Schema form of Kubernetes' OpenAPI definitions that the
PyPI package ``kubernetes-validate`` ships, one folder per release
(``kubernetes_validate/kubernetes-json-schema/v<release>-local-strict``). The
*strict* variant forbids properties the API does not define, so a misspelt or
misplaced field fails here as ``kubectl apply --validate=strict`` would fail it;
types, enums and required fields are checked as well. :data:`KUBERNETES` pins the
release; :func:`schema_errors` lists every violation with its path.

What the OpenAPI schema cannot say, the API server's own validation checks when it
gets the object; :func:`name_errors` adds the rules a manifest of ours could break:
object names and label keys and values.
"""

from __future__ import annotations

import functools
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

KUBERNETES = "1.34.0"
"""The Kubernetes release whose API the manifests must fit."""
PACKAGE = "kubernetes_validate"


def schema_dir(release: str = KUBERNETES) -> Path:
    folder = Path(str(files(PACKAGE))) / "kubernetes-json-schema" / f"v{release}-local-strict"
    if not folder.is_dir():
        raise LookupError(f"{PACKAGE} has no schemas for Kubernetes {release} ({folder})")
    return folder


def schema_file(kind: str, api_version: str, release: str = KUBERNETES) -> Path:
    """``job-batch-v1.json``, ``service-v1.json``, ``role-rbac-v1.json``: the package's names."""
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return schema_dir(release) / f"{kind.lower()}-{group}.json"


@functools.cache
def _validator(kind: str, api_version: str, release: str) -> jsonschema.Validator:
    path = schema_file(kind, api_version, release)
    if not path.is_file():
        raise LookupError(f"no schema for {api_version} {kind} in Kubernetes {release}")
    schema = json.loads(path.read_text())
    definitions = json.loads((schema_dir(release) / "_definitions.json").read_text())
    registry = Registry().with_resources(
        [(schema["$id"], Resource.from_contents(schema))]
        + [(definitions["$id"], Resource.from_contents(definitions))]
    )
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def _path(error: jsonschema.ValidationError) -> str:
    text = ""
    for part in error.absolute_path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "(top)"


def schema_errors(manifest: dict[str, Any], release: str = KUBERNETES) -> list[str]:
    """Every way ``manifest`` breaks its kind's schema: ``path: message``, sorted."""
    validator = _validator(manifest["kind"], manifest["apiVersion"], release)
    return sorted(f"{_path(e)}: {e.message}" for e in validator.iter_errors(manifest))


DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _label_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return bool(LABEL_NAME.match(name)) and (not prefix or bool(DNS_SUBDOMAIN.match(prefix)))


def _metadata(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The object's metadata and its pod template's, if any."""
    found = [("metadata", manifest.get("metadata") or {})]
    template = (manifest.get("spec") or {}).get("template")
    if isinstance(template, dict):
        found.append(("spec.template.metadata", template.get("metadata") or {}))
    return found


def name_errors(manifest: dict[str, Any]) -> list[str]:
    """The API server's rules for names and labels (not in the OpenAPI schema)."""
    errors = []
    name = (manifest.get("metadata") or {}).get("name", "")
    rule = DNS_1035_LABEL if manifest["kind"] == "Service" else DNS_SUBDOMAIN
    if not rule.match(name):
        errors.append(f"metadata.name: {name!r} is not a valid {manifest['kind']} name")
    for where, meta in _metadata(manifest):
        for key, value in (meta.get("labels") or {}).items():
            if not _label_key_ok(key):
                errors.append(f"{where}.labels: key {key!r} is not a valid label key")
            if not isinstance(value, str) or not LABEL_VALUE.match(value):
                errors.append(f"{where}.labels[{key}]: {value!r} is not a valid label value")
    return errors


def assert_valid(manifest: dict[str, Any], release: str = KUBERNETES) -> None:
    """Fail with every schema and naming error of ``manifest``, one per line."""
    errors = schema_errors(manifest, release) + name_errors(manifest)
    where = f"{manifest.get('kind')} {(manifest.get('metadata') or {}).get('name')}"
    assert not errors, f"{where} is not valid for Kubernetes {release}:\n" + "\n".join(errors)
