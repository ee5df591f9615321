"""The model card of a registered version: its facts as JSON, rendered as markdown.

``register`` gathers the facts (:func:`publish_card`): data, recipe, test metrics with
intervals, the gate's verdict, the drift reference, CPU throughput. They are logged
as ``card/card.json`` in the run that registered the version, and the rendered card
is the version's **description** in the MLflow registry (the model version page
shows it) and ``card/model_card.md``. Each scoring run and each export refreshes
it (:func:`refresh_card`): the alias history, the export parity checks (the
version's ``export.*`` tags) and the scoring history (the scoring runs tagged with
the version) are read live from MLflow at every rendering.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import StageError
from tasks.tracking.registry import alias_history

if TYPE_CHECKING:
    from mlflow import MlflowClient

FOLDER = "card"
FACTS = "card.json"
MARKDOWN = "model_card.md"
SCORING_VERSION_TAG = "scoring.model_version"
SCORING_MODEL_TAG = "scoring.model"
HISTORY_ROWS = 12


def publish_card(client: MlflowClient, name: str, version: str, facts: dict[str, Any]) -> str:
    """Log the facts in the version's run and render the card into its description."""
    run_id = client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory(prefix="tasks-card-") as tmp:
        file = Path(tmp) / FACTS
        file.write_text(json.dumps(facts, indent=2, default=str))
        client.log_artifact(run_id, str(file), FOLDER)
    return refresh_card(client, name, version, facts=facts)


def read_facts(client: MlflowClient, name: str, version: str) -> dict[str, Any]:
    """The facts ``register`` stored for the version ({} when it stored none)."""
    from mlflow.exceptions import MlflowException

    run_id = client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory(prefix="tasks-card-") as tmp:
        try:
            local = client.download_artifacts(run_id, f"{FOLDER}/{FACTS}", tmp)
        except (MlflowException, OSError):
            return {}
        return json.loads(Path(local).read_text())


def refresh_card(
    client: MlflowClient,
    name: str,
    version: str,
    run_id: str | None = None,
    facts: dict[str, Any] | None = None,
) -> str:
    """Render the card from the stored facts (``facts``: those just stored, so nothing is
    downloaded) and MLflow's live records; make it the version's description, and log it as
    ``card/model_card.md`` in ``run_id`` (the version's own run when None). Returns the
    markdown."""
    text = render_card(client, name, version, facts)
    client.update_model_version(name, version, description=text)
    target = run_id or client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory(prefix="tasks-card-") as tmp:
        file = Path(tmp) / MARKDOWN
        file.write_text(text)
        client.log_artifact(target, str(file), FOLDER)
    return text


def render_card(
    client: MlflowClient, name: str, version: str, facts: dict[str, Any] | None = None
) -> str:
    """The card as markdown (what ``python -m tasks card`` prints)."""
    from mlflow.exceptions import MlflowException

    try:
        model_version = client.get_model_version(name, version)
    except MlflowException:
        raise StageError(
            f"{name} has no version {version}; list them with `python -m tasks history`"
        ) from None
    facts = read_facts(client, name, version) if facts is None else facts
    aliases = ", ".join(f"@{a}" for a in model_version.aliases) or "no alias"
    lines = [f"# {name} v{version}", "", f"**Aliases:** {aliases}."]
    lines += _intended_use(facts)
    lines += _data(facts.get("data") or {})
    lines += _recipe(facts.get("recipe") or {})
    lines += _metrics(facts.get("test") or {})
    lines += _gate(facts.get("gate") or {}, alias_history(client, name), version)
    lines += _reference(facts.get("reference") or {}, facts.get("drift_settings") or {})
    lines += _exports(model_version.tags)
    lines += _throughput(facts.get("throughput") or {})
    lines += _scoring(client, facts.get("experiment_id"), name, version)
    return "\n".join(lines).rstrip() + "\n"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return out


def _intended_use(facts: dict[str, Any]) -> list[str]:
    classes = ", ".join(facts.get("classes") or []) or "its classes"
    recipe = facts.get("recipe") or {}
    size = recipe.get("image_size", "?")
    test = facts.get("test") or {}
    lines = [
        "",
        "## Intended use",
        f"Sorts RGB photos into **{classes}**: uint8 images resized to {size}×{size} in, one "
        "probability per class out. Use it on images like its training data "
        f"({facts.get('dataset', 'the dataset')}); score new images with "
        "`python -m tasks score`, which checks them and tests them for drift.",
        "",
        "## Known limits",
        f"- It knows only {classes}: an image of anything else still gets one of them. "
        "Drift tests on each scored drop flag images unlike the training data.",
        f"- Its test figures come from {test.get('images', '?')} held-out images; the "
        "intervals below say how far they can be trusted.",
    ]
    if test.get("ece") is not None:
        lines.append(
            f"- Calibration error (ECE) on the test split: {test['ece']:.3f}: its probabilities "
            "are confidence scores, not certainties."
        )
    return lines


def _data(data: dict[str, Any]) -> list[str]:
    if not data:
        return []
    counts = data.get("counts") or {}
    order = {"train": 0, "validation": 1, "test": 2}
    counts = dict(sorted(counts.items(), key=lambda item: (order.get(item[0], 3), item[0])))
    classes = sorted({c for split in counts.values() for c in split})
    rows = [[split, *(counts[split].get(c, 0) for c in classes), sum(counts[split].values())]
            for split in counts]  # fmt: skip
    lines = ["", "## Data", f"Manifest md5 `{data.get('manifest_md5', '?')}`."]
    lines += ["", *_table(["split", *classes, "images"], rows)]
    if data.get("validation"):
        lines += ["", f"Validation: {data['validation']}."]
    if data.get("feedback_drops"):
        lines += [f"Fed-back drops: {', '.join(data['feedback_drops'])}."]
    return lines


def _recipe(recipe: dict[str, Any]) -> list[str]:
    if not recipe:
        return []
    rows = [[key, "the backbone's default" if value is None else f"`{value}`"]
            for key, value in recipe.items()]  # fmt: skip
    return ["", "## Recipe", *_table(["parameter", "value"], rows)]


def _metrics(test: dict[str, Any]) -> list[str]:
    if not test:
        return []
    intervals = test.get("intervals") or {}
    rows = []
    for key in ("accuracy", "f1_macro", "roc_auc", "ece", "log_loss"):
        if test.get(key) is None:
            continue
        low_high = intervals.get(key)
        ci = f"{low_high[0]:.4f} – {low_high[1]:.4f}" if low_high else ""
        rows.append([key, f"{test[key]:.4f}", ci])
    return [
        "",
        f"## Test metrics ({test.get('images', '?')} held-out images, 95% bootstrap intervals)",
        *_table(["metric", "value", "95% interval"], rows),
    ]


def _gate(gate: dict[str, Any], moves: list[dict[str, Any]], version: str) -> list[str]:
    lines = ["", "## Gate"]
    if gate:
        against = gate.get("champion_version")
        lines.append(
            f"**{gate.get('status')}** ({gate.get('verdict')}) on test {gate.get('metric')} "
            f"{gate.get('candidate_score', 0):.4f}, "
            + (f"against champion v{against}" if against else "with no champion before it")
            + f": {gate.get('reason')}."
        )
    mine = [m for m in moves if str(m.get("version")) == str(version)]
    if mine:
        rows = [[m.get("time", ""), f"@{m.get('alias')}", m.get("decision", ""),
                 m.get("by") or "the gate"] for m in mine]  # fmt: skip
        lines += ["", *_table(["when", "alias", "decision", "by"], rows)]
    return lines


def _reference(reference: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    if not reference:
        return ["", "## Drift reference", "None: drops scored with it are not tested for drift."]
    return [
        "",
        "## Drift reference",
        f"{reference.get('images')} training images embedded ({reference.get('dimensions')} "
        f"dimensions); training prior {_shares(reference.get('prior') or {})}; mean "
        "confidence on the test "
        f"split {reference.get('test_mean_confidence')}. Drops are tested at alpha "
        f"{settings.get('alpha', '?')} (domain classifier AUC > {settings.get('domain_auc', '?')}, "
        "MMD, class share, confidence).",
    ]


def _shares(prior: dict[str, float]) -> str:
    return ", ".join(f"{name} {share:.0%}" for name, share in prior.items())


def _exports(tags: dict[str, str]) -> list[str]:
    formats = sorted({key.split(".")[1] for key in tags if key.startswith("export.")})
    if not formats:
        return ["", "## Export parity", "Not exported yet (`python -m tasks export <dataset>`)."]
    rows = [[f, tags.get(f"export.{f}.max_abs_diff", ""), tags.get(f"export.{f}.images", "")]
            for f in formats]  # fmt: skip
    return ["", "## Export parity", *_table(["format", "max |Δp| vs Keras", "images"], rows)]


def _throughput(throughput: dict[str, Any]) -> list[str]:
    if not throughput:
        return []
    return [
        "",
        "## CPU throughput",
        f"{throughput.get('images_per_second')} images/s (batch {throughput.get('batch')}, "
        f"{throughput.get('images')} images, {throughput.get('cpu')}).",
    ]


def _scoring(client: MlflowClient, experiment_id: str | None, name: str, version: str):
    if not experiment_id:
        return []
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SCORING_MODEL_TAG}` = '{name}' and "
        f"tags.`{SCORING_VERSION_TAG}` = '{version}'",
        order_by=["attributes.start_time DESC"],
        max_results=HISTORY_ROWS,
    )
    if not runs:
        return ["", "## Scoring history", "No drop scored with this version yet."]
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        live = metrics.get("live.accuracy")
        rows.append([
            tags.get("scoring.drop", ""),
            int(metrics.get("images", 0)),
            int(metrics.get("quarantined", 0)),
            tags.get("drift", ""),
            tags.get("drift.flagged", ""),
            "" if live is None else f"{live:.4f}",
        ])  # fmt: skip
    header = ["drop", "images", "quarantined", "drift", "flagged by", "live accuracy"]
    return ["", "## Scoring history (newest first)", *_table(header, rows)]
