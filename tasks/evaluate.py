"""Score the candidate model on the validation split and draw the evaluation plots.

Reads ``models/<ds>/candidate.json`` (which model fine-tuning passed on), the
manifest's ``validation`` rows with status ``ok``, and ``reports/<ds>/history.csv``.
Writes (each atomically):

- ``reports/<ds>/metrics.json``: accuracy, macro precision/recall/F1, ROC AUC,
  log loss, expected calibration error (10 bins), per-class precision/recall/F1
  and the confusion matrix (DVC metrics);
- ``reports/<ds>/predictions.csv``: one row per validation image (DVC confusion plot);
- ``reports/<ds>/plots/``: confusion matrix, ROC curve, training curves of both
  phases, the most confident mistakes, Grad-CAM overlays.

The same numbers and files go to the ``evaluate`` child run in MLflow.

The metric functions here are pure (numpy in, numbers out) so the registry gate
and the tests use exactly the same definitions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.atomic import atomic_path, write_json, write_text
from tasks.config import Config
from tasks.errors import StageError
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import keras
    import pandas as pd

log = logging.getLogger(__name__)

ECE_BINS = 10
SCALAR_METRICS = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "roc_auc",
    "log_loss",
    "ece",
)
PLOTS = ("confusion_matrix", "roc_curve", "training_curves", "mistakes", "gradcam")
_EPS = 1e-7


# ---------------------------------------------------------------- pure metrics


def class_probabilities(outputs: Any, n_classes: int) -> np.ndarray:
    """The model's raw output as an (images, classes) probability array.

    Two classes may come as one sigmoid column, P(classes[1]); it becomes
    ``[1 - p, p]``. Anything else must already have one column per class.
    """
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2:
        raise StageError(f"the model outputs shape {out.shape}; expected (images, classes)")
    if out.shape[1] == 1 and n_classes == 2:
        return np.hstack([1.0 - out, out])
    if out.shape[1] != n_classes:
        raise StageError(
            f"the model outputs {out.shape[1]} values per image but there are {n_classes} "
            "classes; retrain it for this dataset's classes"
        )
    return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with actual class as row, predicted class as column."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return matrix


def expected_calibration_error(
    y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size.

    Confidence is the top class probability; bin ``b`` holds ``(b/bins, (b+1)/bins]``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=int)
    if not len(y_true):
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            total += members.mean() * gap
    return float(total)


def log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log probability of the true class (clipped at 1e-7)."""
    probs = np.asarray(probs, dtype=np.float64)
    picked = probs[np.arange(len(y_true)), np.asarray(y_true, int)]
    return float(-np.log(np.clip(picked, _EPS, 1.0)).mean())


def roc_points(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) over every distinct score threshold.

    ``truth`` is 1 for positives; both classes must be present.
    """
    truth = np.asarray(truth, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], truth[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tps = np.cumsum(hits)[last_of_each]
    fps = (last_of_each + 1) - tps
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC of ``classes[1]`` (two classes) or the mean one-vs-rest AUC; None if undefined."""
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    if len(set(y_true.tolist())) < n_classes:
        return None
    positives = [1] if n_classes == 2 else range(n_classes)
    areas = [np.trapezoid(*reversed(roc_points(y_true == k, probs[:, k]))) for k in positives]
    return float(np.mean(areas))


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """All evaluation numbers for integer labels and an (images, classes) probability array."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if probs.shape != (len(y_true), n_classes):
        raise ValueError(f"probs has shape {probs.shape}; expected ({len(y_true)}, {n_classes})")
    if not len(y_true):
        raise StageError("there are no validation images to evaluate on")
    y_pred = probs.argmax(axis=1)
    matrix = confusion(y_true, y_pred, n_classes)
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(n_classes), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(n_classes), where=both > 0)
    return {
        "images": int(len(y_true)),
        "accuracy": float(tp.sum() / len(y_true)),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "roc_auc": roc_auc(y_true, probs),
        "log_loss": log_loss(y_true, probs),
        "ece": expected_calibration_error(y_true, probs),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(actual[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": {"labels": list(classes), "matrix": matrix.tolist()},
    }


def confident_mistakes(y_true: np.ndarray, probs: np.ndarray, limit: int) -> np.ndarray:
    """Indices of wrongly classified images, most confident first, at most ``limit``."""
    probs = np.asarray(probs)
    wrong = np.flatnonzero(probs.argmax(axis=1) != np.asarray(y_true))
    order = np.argsort(-probs.max(axis=1)[wrong], kind="stable")
    return wrong[order][: max(0, limit)]


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of :func:`classification_metrics` under flat names, for MLflow."""
    flat = {key: float(metrics[key]) for key in SCALAR_METRICS if metrics.get(key) is not None}
    flat["images"] = float(metrics["images"])
    for name, values in metrics["per_class"].items():
        for key, value in values.items():
            flat[f"{key}.{name}"] = float(value)
    labels = metrics["confusion_matrix"]["labels"]
    for i, row in enumerate(metrics["confusion_matrix"]["matrix"]):
        for j, count in enumerate(row):
            flat[f"confusion.{labels[i]}.{labels[j]}"] = float(count)
    return flat


# ---------------------------------------------------------------- inputs


def validation_frame(paths: DatasetPaths, classes: Sequence[str]) -> pd.DataFrame:
    """The manifest's usable validation rows, with ``label_index`` (position in ``classes``)."""
    from tasks.data import read_manifest, usable_rows

    frame = usable_rows(read_manifest(paths), "validation", classes)
    frame = frame.sort_values("path", kind="stable").reset_index(drop=True)
    frame["label_index"] = frame["label"].map({name: i for i, name in enumerate(classes)})
    return frame


def read_candidate(paths: DatasetPaths) -> tuple[Path, dict[str, Any]]:
    """The model file named in ``candidate.json`` and the record itself."""
    if not paths.candidate.exists():
        raise StageError(
            f"{paths.candidate} not found; run `python -m tasks finetune {paths.dataset}` first"
        )
    try:
        record = json.loads(paths.candidate.read_text())
        model = paths.root / record["path"]
    except (ValueError, KeyError, TypeError):
        raise StageError(
            f"{paths.candidate} is not a candidate record with a 'path'; rerun "
            f"`python -m tasks finetune {paths.dataset}`"
        ) from None
    if not model.exists():
        raise StageError(
            f"candidate model {model} (named in {paths.candidate}) is missing; rerun "
            f"`python -m tasks finetune {paths.dataset}` or `dvc pull`"
        )
    return model, record


def load_keras_model(path: Path) -> keras.Model:
    """Load a saved end-to-end model through ``tasks.model`` (which registers its layers)."""
    from tasks.model import load_model

    try:
        return load_model(path)
    except (OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StageError(f"cannot load model {path}: {first}; is it a .keras file?") from None


def model_image_size(model: keras.Model) -> tuple[int, int]:
    """(height, width) of the model's image input."""
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[1] and shape[2]):
        raise StageError(f"the model's input shape {shape} is not (batch, height, width, 3)")
    return int(shape[1]), int(shape[2])


def predict_frame(
    model: keras.Model,
    frame: pd.DataFrame,
    raw_root: Path,
    classes: Sequence[str],
    batch_size: int,
) -> np.ndarray:
    """(images, classes) probabilities for the validation rows of ``frame``, in order.

    Images come through the training input pipeline (``tasks.data.make_dataset``),
    so they are decoded and resized exactly as in training.
    """
    from tasks.data import make_dataset

    height, width = model_image_size(model)
    if height != width:
        raise StageError(f"the model's input is {height}x{width}; the pipeline makes square images")
    dataset = make_dataset(
        frame,
        Path(raw_root),
        "validation",
        classes,
        height,
        batch_size,
        augment=None,
        shuffle=False,
        seed=0,
    )
    outputs = model.predict(dataset.map(lambda images, labels: images), verbose=0)
    return class_probabilities(outputs, len(classes))


# ---------------------------------------------------------------- Grad-CAM


def model_pieces(model: keras.Model) -> tuple[list[Any], Any, list[Any]]:
    """The layers before the ``backbone`` sub-model, the backbone, and the layers after it.

    A ``Sequential`` after the backbone (the ``head``) is opened into its layers.
    """
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = [layer.name for layer in layers]
    if "backbone" not in names:
        raise StageError(
            f"the model has no layer named 'backbone' (layers: {names}); Grad-CAM needs "
            "the model built by tasks.model"
        )
    index = names.index("backbone")
    after: list[Any] = []
    for layer in layers[index + 1 :]:
        after.extend(layer.layers if isinstance(layer, keras.Sequential) else [layer])
    return layers[:index], layers[index], after


def _class_logits(layers: list[Any], features: Any) -> tuple[Any, str]:
    """Run the head on ``features``; return its pre-activation output and the activation.

    Grad-CAM differentiates the class score before the sigmoid/softmax, so a
    confident (saturated) prediction still has a gradient.
    """
    import keras

    y = features
    for layer in layers[:-1]:
        y = layer(y, training=False)
    last = layers[-1]
    activation = getattr(last, "activation", None)
    kind = getattr(activation, "__name__", "")
    if isinstance(last, keras.layers.Dense) and kind in ("sigmoid", "softmax"):
        z = keras.ops.matmul(y, last.kernel)
        if last.use_bias:
            z = z + last.bias
        return z, kind
    return last(y, training=False), "probabilities"


def gradcam(model: keras.Model, images: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Grad-CAM heatmaps (images, H, W) in [0, 1] for each image's predicted class.

    Runs the model in pieces (preprocessing → backbone → head) so the gradient
    of the predicted class's score (its logit where the head ends in a sigmoid
    or softmax Dense) can be taken with respect to the backbone's output feature
    map. Also returns the (images, classes) probabilities; heatmaps are None when
    the backbone's output is not a spatial map.
    """
    import tensorflow as tf

    before, backbone, after = model_pieces(model)
    x = tf.convert_to_tensor(np.asarray(images, np.float32))
    for layer in before:
        x = layer(x, training=False)
    with tf.GradientTape() as tape:
        features = backbone(x, training=False)
        tape.watch(features)
        z, kind = _class_logits(after, features)
        z = tf.cast(z, tf.float32)
        if kind == "sigmoid":
            outputs = tf.sigmoid(z)
        elif kind == "softmax":
            outputs = tf.nn.softmax(z, axis=-1)
        else:
            outputs = z
        if outputs.shape[-1] == 1:
            predicted = tf.cast(outputs[:, 0] >= 0.5, tf.int32)
            score = tf.where(
                predicted == 1, z[:, 0], -z[:, 0] if kind == "sigmoid" else 1 - z[:, 0]
            )
        else:
            predicted = tf.argmax(outputs, axis=-1, output_type=tf.int32)
            score = tf.gather(z, predicted, batch_dims=1)
    probs = class_probabilities(outputs.numpy(), max(2, int(outputs.shape[-1])))
    if len(features.shape) != 4:
        return None, probs
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + 1e-8)
    cam = tf.image.resize(cam[..., None], np.asarray(images).shape[1:3], method="bilinear")
    return np.clip(cam[..., 0].numpy(), 0.0, 1.0), probs


# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class EvaluationResult:
    dataset: str
    model: str
    images: int
    metrics: dict[str, Any]
    plots: tuple[str, ...]
    run_id: str

    def __str__(self) -> str:
        m = self.metrics
        auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
        lines = [
            f"evaluate {self.dataset}: {self.model} on {self.images} validation images",
            f"  accuracy {m['accuracy']:.4f}  f1_macro {m['f1_macro']:.4f}  roc_auc {auc}"
            f"  log_loss {m['log_loss']:.4f}  ece {m['ece']:.4f}",
        ]
        for name, values in m["per_class"].items():
            lines.append(
                f"  {name}: precision {values['precision']:.4f}  recall {values['recall']:.4f}"
                f"  f1 {values['f1']:.4f}  (n={values['support']})"
            )
        lines.append(f"  plots: {', '.join(self.plots)}  (MLflow run {self.run_id})")
        return "\n".join(lines)


def _read_history(paths: DatasetPaths) -> tuple[pd.DataFrame | None, str]:
    import pandas as pd

    if not paths.history.exists():
        log.warning("%s not found; the training-curves figure says so", paths.history)
        return None, f"no training history: {paths.history} not found"
    history = pd.read_csv(paths.history)
    missing = {"phase", "epoch", "loss", "accuracy"} - set(history.columns)
    if missing:
        return None, f"{paths.history} lacks columns {sorted(missing)}"
    return history, ""


def _feature_map(model: keras.Model) -> tuple[int, int] | None:
    shape = model_pieces(model)[1].output.shape
    return (int(shape[1]), int(shape[2])) if len(shape) == 4 and shape[1] and shape[2] else None


def _spread(count: int, limit: int) -> list[int]:
    if limit <= 0 or count == 0:
        return []
    return sorted(set(np.linspace(0, count - 1, min(limit, count)).round().astype(int).tolist()))


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
    from tasks import plots
    from tasks.predict import read_image

    y_true = frame["label_index"].to_numpy()
    y_pred = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    size = model_image_size(model)
    files = [paths.raw / p for p in frame["path"]]
    written = [
        plots.confusion_matrix(
            np.array(metrics["confusion_matrix"]["matrix"]),
            classes,
            folder / "confusion_matrix.png",
        ),
        plots.roc_curves(y_true, probs, classes, folder / "roc_curve.png"),
    ]
    history, why = _read_history(paths)
    written.append(plots.training_curves(history, folder / "training_curves.png", why))

    wrong = confident_mistakes(y_true, probs, cfg.evaluate.mistakes)
    written.append(
        plots.image_grid(
            [read_image(files[i], size) for i in wrong],
            [
                f"{classes[y_true[i]]} → {classes[y_pred[i]]} ({confidence[i]:.2f})\n"
                f"{Path(frame['path'][i]).name}"
                for i in wrong
            ],
            folder / "mistakes.png",
            title=f"Most confident mistakes (actual → predicted, confidence); "
            f"{int((y_pred != y_true).sum())} of {len(y_true)} wrong",
            empty=(
                "no mistakes: every validation image was classified correctly"
                if (y_pred == y_true).all()
                else "mistakes not drawn (evaluate.mistakes is 0)"
            ),
        )
    )

    chosen = _spread(len(files), cfg.evaluate.gradcam_images)
    images = [read_image(files[i], size) for i in chosen]
    heatmaps, note, titles = None, "evaluate.gradcam_images is 0", []
    if images:
        heatmaps, cam_probs = gradcam(model, np.stack(images))
        note = "" if heatmaps is not None else "the backbone's output is not a spatial map"
        titles = [
            f"actual {classes[y_true[i]]}\npredicted {classes[p.argmax()]} ({p.max():.2f})"
            for i, p in zip(chosen, cam_probs, strict=True)
        ]
    written.append(
        plots.gradcam_overlays(
            images,
            None if heatmaps is None else list(heatmaps),
            titles,
            folder / "gradcam.png",
            note,
            feature_map=_feature_map(model),
        )
    )
    return written


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


def evaluate(cfg: Config, paths: DatasetPaths) -> EvaluationResult:
    """Score the candidate on the validation split; write metrics, predictions and plots."""
    import mlflow

    from tasks.tracking import file_md5, phase_run

    classes = cfg.dataset(paths.dataset).classes
    model_path, record = read_candidate(paths)
    frame = validation_frame(paths, classes)
    model = load_keras_model(model_path)
    probs = predict_frame(model, frame, paths.raw, classes, cfg.train.batch_size)
    metrics = classification_metrics(frame["label_index"].to_numpy(), probs, classes)
    relative = model_path.relative_to(paths.root).as_posix()
    report = {
        "model": relative,
        "phase": record.get("phase"),
        **metrics,
    }

    with atomic_path(paths.plots) as staging:
        staging.mkdir(parents=True)
        drawn = draw_plots(cfg, paths, model, frame, probs, metrics, classes, staging)
        names = tuple(p.name for p in drawn)
    write_text(paths.predictions, predictions_csv(frame, probs, classes))
    write_json(paths.metrics, report)

    with phase_run(cfg, paths, "evaluate") as run:
        mlflow.set_tags(
            {
                "model.path": relative,
                "model.phase": str(record.get("phase")),
                "model.md5": file_md5(model_path),
            }
        )
        mlflow.log_metrics(flat_metrics(metrics))
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
    )
