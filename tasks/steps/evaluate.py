"""``evaluate``: score the candidate model on the held-out test split and draw the figures.

Reads ``models/<ds>/candidate.json`` (which model fine-tuning passed on), the
manifest's ``test`` and ``validation`` rows with status ``ok``, and
``reports/<ds>/history.csv``. The **test** split is the honest number: no
training step, early stopping or frozen/fine-tuned choice has seen it. The
validation split, which early stopping and the candidate choice were made on,
is reported beside it, labelled, because the gap between the two is worth seeing.
Writes (each atomically):

- ``reports/<ds>/metrics.json``: on the test split (top level, ``split: test``)
  accuracy, macro precision/recall/F1, ROC AUC, average precision, log loss,
  expected calibration error (10 bins), per-class precision/recall/F1 and the
  confusion matrix; the same on validation under ``validation`` (DVC metrics;
  definitions in ``tasks.ml.metrics``);
- ``reports/<ds>/predictions.csv``: one row per test image (DVC confusion plot);
- ``reports/<ds>/plots/``: on the test split, the confusion matrix, ROC and
  precision-recall curves, the reliability diagram, per-class metrics, the
  most confident mistakes and Grad-CAM overlays; and the training curves of
  both phases.

The same numbers (``test.*`` and ``validation.*``) and files go to the
``evaluate`` child run in MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.artifacts import image_root, labelled_rows, load_model, read_candidate, read_history
from tasks.config import Config
from tasks.io import atomic_path, file_md5, write_json, write_text
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import keras
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationResult:
    dataset: str
    model: str
    images: int
    """Test images scored."""
    metrics: dict[str, Any]
    """On the held-out test split."""
    plots: tuple[str, ...]
    run_id: str
    validation: dict[str, Any] | None = None
    """The same metrics on the validation split (model selection saw it)."""

    def __str__(self) -> str:
        lines = [f"evaluate {self.dataset}: {self.model}"]
        lines += _metric_lines("test (held out)", self.metrics, per_class=True)
        if self.validation:
            lines += _metric_lines(
                "validation (used for early stopping and the candidate choice)",
                self.validation,
                per_class=False,
            )
        lines.append(f"  plots: {', '.join(self.plots)}  (MLflow run {self.run_id})")
        return "\n".join(lines)


def _metric_lines(title: str, m: dict[str, Any], per_class: bool) -> list[str]:
    def fmt(key: str) -> str:
        return "n/a" if m.get(key) is None else f"{m[key]:.4f}"

    lines = [
        f"  {title}, {m['images']} images:",
        f"    accuracy {fmt('accuracy')}  f1_macro {fmt('f1_macro')}  roc_auc {fmt('roc_auc')}"
        f"  avg_precision {fmt('average_precision')}  log_loss {fmt('log_loss')}"
        f"  ece {fmt('ece')}",
    ]
    if per_class:
        for name, values in m["per_class"].items():
            lines.append(
                f"    {name}: precision {values['precision']:.4f}  recall {values['recall']:.4f}"
                f"  f1 {values['f1']:.4f}  (n={values['support']})"
            )
    return lines


def _spread(count: int, limit: int) -> list[int]:
    if limit <= 0 or count == 0:
        return []
    return sorted(set(np.linspace(0, count - 1, min(limit, count)).round().astype(int).tolist()))


def _score(
    model: keras.Model,
    cfg: Config,
    paths: DatasetPaths,
    frame: pd.DataFrame,
    classes: Sequence[str],
) -> tuple[np.ndarray, dict[str, Any]]:
    """The model's probabilities on a split's labelled rows, and the metrics."""
    from tasks.ml.metrics import classification_metrics
    from tasks.ml.model import predict_rows

    probs = predict_rows(model, frame, image_root(paths, frame), classes, cfg.train.batch_size)
    return probs, classification_metrics(frame["label_index"].to_numpy(), probs, classes)


def draw_plots(
    cfg: Config,
    paths: DatasetPaths,
    model: keras.Model,
    frame: pd.DataFrame,
    probs: np.ndarray,
    metrics: dict[str, Any],
    classes: Sequence[str],
    folder: Path,
) -> list[Path]:
    """Write every evaluation PNG into ``folder``; returns their paths."""
    from tasks.ml import plots

    y_true = frame["label_index"].to_numpy()
    written = [
        plots.confusion_matrix(
            np.array(metrics["confusion_matrix"]["matrix"]),
            classes,
            folder / "confusion_matrix.png",
            split="test",
        ),
        plots.roc_curves(y_true, probs, classes, folder / "roc_curve.png", split="test"),
        plots.precision_recall_curves(
            y_true, probs, classes, folder / "pr_curve.png", split="test"
        ),
        plots.reliability_diagram(
            y_true, probs, folder / "reliability.png", metrics["ece"], split="test"
        ),
        plots.per_class_metrics(metrics["per_class"], folder / "per_class.png", split="test"),
    ]
    history, why = read_history(paths)
    written.append(plots.training_curves(history, folder / "training_curves.png", why))
    written.append(_mistakes(cfg, paths, model, frame, probs, classes, folder))
    written.append(_gradcam(cfg, paths, model, frame, classes, folder))
    return written


def _mistakes(
    cfg: Config,
    paths: DatasetPaths,
    model: keras.Model,
    frame: pd.DataFrame,
    probs: np.ndarray,
    classes: Sequence[str],
    folder: Path,
) -> Path:
    """``mistakes.png``: the most confident wrong predictions on the test split."""
    from tasks.ml import plots
    from tasks.ml.images import read_image
    from tasks.ml.metrics import confident_mistakes
    from tasks.ml.model import model_image_size
    from tasks.ml.shards import image_file

    y_true, y_pred, confidence = frame["label_index"].to_numpy(), probs.argmax(1), probs.max(1)
    wrong = confident_mistakes(y_true, probs, cfg.evaluate.mistakes)
    root = image_root(paths, frame)
    size = model_image_size(model)
    return plots.image_grid(
        [read_image(image_file(root, frame.iloc[i]), size) for i in wrong],
        [
            f"{classes[y_true[i]]} → {classes[y_pred[i]]} ({confidence[i]:.2f})\n"
            f"{Path(frame['path'][i]).name}"
            for i in wrong
        ],
        folder / "mistakes.png",
        title=f"Most confident mistakes on the test split (actual → predicted, confidence); "
        f"{int((y_pred != y_true).sum())} of {len(y_true)} wrong",
        empty=(
            "no mistakes: every test image was classified correctly"
            if (y_pred == y_true).all()
            else "mistakes not drawn (evaluate.mistakes is 0)"
        ),
    )


def _gradcam(
    cfg: Config,
    paths: DatasetPaths,
    model: keras.Model,
    frame: pd.DataFrame,
    classes: Sequence[str],
    folder: Path,
) -> Path:
    """``gradcam.png``: where the model looked, on test images spread over the split."""
    from tasks.ml import plots
    from tasks.ml.gradcam import feature_map_size, gradcam
    from tasks.ml.images import read_image
    from tasks.ml.model import model_image_size
    from tasks.ml.shards import image_file

    y_true = frame["label_index"].to_numpy()
    chosen = _spread(len(frame), cfg.evaluate.gradcam_images)
    size = model_image_size(model)
    root = image_root(paths, frame)
    images = [read_image(image_file(root, frame.iloc[i]), size) for i in chosen]
    heatmaps, note, titles = None, "evaluate.gradcam_images is 0", []
    if images:
        heatmaps, cam_probs = gradcam(model, np.stack(images))
        note = "" if heatmaps is not None else "the backbone's output is not a spatial map"
        titles = [
            f"actual {classes[y_true[i]]}\npredicted {classes[p.argmax()]} ({p.max():.2f})"
            for i, p in zip(chosen, cam_probs, strict=True)
        ]
    return plots.gradcam_overlays(
        images,
        None if heatmaps is None else list(heatmaps),
        titles,
        folder / "gradcam.png",
        note,
        feature_map=feature_map_size(model),
    )


def predictions_csv(frame: pd.DataFrame, probs: np.ndarray, classes: Sequence[str]) -> str:
    """One row per image: path, actual, predicted, confidence, prob_<class>..."""
    import pandas as pd

    table = pd.DataFrame(
        {
            "path": frame["path"],
            "actual": frame["label"],
            "predicted": [classes[i] for i in probs.argmax(axis=1)],
            "confidence": probs.max(axis=1).round(6),
        }
    )
    for i, name in enumerate(classes):
        table[f"prob_{name}"] = probs[:, i].round(6)
    return table.to_csv(index=False)


HEADLINE_TEST = ("test.accuracy", "test.f1_macro", "test.roc_auc", "test.ece", "test.log_loss")
"""The test metrics the parent run (one row per pipeline execution) carries."""


def run(cfg: Config, paths: DatasetPaths) -> EvaluationResult:
    """Score the candidate on the test split (and, labelled, validation); write the reports."""
    import mlflow

    from tasks.ml.metrics import flat_metrics
    from tasks.tracking.models import log_evaluated_model
    from tasks.tracking.runs import log_headline, phase_run

    # Score the candidate on the test split and the (labelled) validation split
    classes = cfg.dataset(paths.dataset).classes
    model_path, record = read_candidate(paths)
    frame = labelled_rows(paths, "test", classes)
    held_out = labelled_rows(paths, "validation", classes)
    model = load_model(model_path)
    probs, metrics = _score(model, cfg, paths, frame, classes)
    _, validation = _score(model, cfg, paths, held_out, classes)
    relative = model_path.relative_to(paths.root).as_posix()
    report = {
        "model": relative,
        "phase": record.get("phase"),
        "split": "test",
        **metrics,
        "validation": {"split": "validation", **validation},
    }

    # Write the reports; log them, the metrics and the evaluated model
    with atomic_path(paths.plots) as staging:
        staging.mkdir(parents=True)
        drawn = draw_plots(cfg, paths, model, frame, probs, metrics, classes, staging)
        names = tuple(p.name for p in drawn)
    write_text(paths.predictions, predictions_csv(frame, probs, classes))
    write_json(paths.metrics, report)

    with phase_run(cfg, paths, "evaluate") as run:
        phase = str(record.get("phase"))
        mlflow.set_tags({"model.path": relative, "model.phase": phase})
        mlflow.set_tag("model.md5", file_md5(model_path))
        test_metrics = {f"test.{k}": v for k, v in flat_metrics(metrics).items()}
        validation_metrics = {f"validation.{k}": v for k, v in flat_metrics(validation).items()}
        mlflow.log_metrics(validation_metrics)
        log_evaluated_model(cfg, paths, model_path, test_metrics, record.get("phase"))
        log_headline(
            {key: test_metrics[key] for key in HEADLINE_TEST if key in test_metrics}
            | {"validation.accuracy": validation_metrics["validation.accuracy"]}
        )
        mlflow.log_artifact(str(paths.metrics))
        mlflow.log_artifact(str(paths.predictions))
        mlflow.log_artifacts(str(paths.plots), artifact_path="plots")
    return EvaluationResult(
        dataset=paths.dataset,
        model=relative,
        images=len(frame),
        metrics=metrics,
        plots=names,
        run_id=run.info.run_id,
        validation=validation,
    )
