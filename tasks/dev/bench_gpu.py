"""``make bench-gpu``: images/s of the pipeline's three kinds of step, per backbone, precision,
XLA setting and batch size, and the projected wall time of the whole cats/dogs pipeline.

Measured for every backbone x precision x jit x batch size:

- **extract**: the frozen feature extractor (preprocessing -> backbone, BatchNorm in
  inference mode), one ``predict_on_batch`` per step, features copied back to the host
  (phase 1 caches them there);
- **head**: one ``train_on_batch`` of the backbone's default head (as in the project's
  registry: pooling -> [Dense relu] -> Dropout -> Dense(1, sigmoid) in float32) on
  in-memory features of the backbone's output shape, RMSprop 1e-4;
- **finetune**: one ``train_on_batch`` of the whole model (preprocessing -> backbone ->
  head) with the backbone's layers from the registry's boundary layer on trainable
  (BatchNormalization stays frozen), RMSprop 1e-5.

Each model is rebuilt under ``keras.mixed_precision.set_global_policy(precision)``
(``keras.backend.clear_session()`` between configurations), compiled with the jit setting,
then every phase runs ``--warmup`` untimed steps (tracing and compilation) and ``--steps``
timed ones: images/s = batch x steps / seconds. Inputs are random 0-255 float32 images
(and features) already on the device, with random weights (``weights=None``, no download):
decoding, augmentation and host-to-device copies are not measured. The preprocessing
(``preprocess_input`` of each backbone) is written with ``keras.ops`` in float32.

Precisions: ``float32``, ``mixed_float16``, ``mixed_bfloat16``; ``mixed_float16`` is skipped
on CPU unless asked for with ``--precisions`` (CPUs have no fast float16 math; the row says
so). jit (``--jit auto``): on TensorFlow both ``False`` and ``True`` (XLA) where there is a
GPU or TPU, only ``False`` on CPU (XLA there compiles for a minute and runs a MobileNetV2
step about 8x slower); on JAX every step is ``jax.jit``-compiled, recorded as
``always (jax)``; on PyTorch only ``False``, since ``True`` means ``torch.compile``
(minutes of compilation per shape). ``--jit on`` or ``--jit both`` asks for them anyway.

A configuration that fails (out of memory, a precision the device cannot do) becomes a
row with an ``error`` and the bench goes on.

Projection: the cats/dogs pipeline (2,000 training and 1,000 validation images, 20 % of
the validation images held out as the test split, 10 head + 10 fine-tune epochs), for
the configuration per backbone that gives the shortest time, with E, H, F the extract,
head and finetune images/s::

    T = (2000 + 800) / E         features of the training and validation images, once
      + 10 * 2000 / H            head epochs on the cached features
      + 10 * (2000 / F + 800 / E)  fine-tune epochs, each with a validation pass
      + 200 / E                  evaluation of the test split
      = 11000 / E + 20000 / H + 20000 / F

It leaves out data loading, augmentation, saving and the head's validation passes
(on features, negligible), so it is a lower bound.

Runs with Keras 3 on any backend (``KERAS_BACKEND``: tensorflow, jax or torch): it
imports nothing from TensorFlow nor from the pipeline's own modules::

    make bench-gpu                          # all backbones, batch 32 64 128 256
    QUICK=1 make bench-gpu                  # mobilenet_v2, 96 px, batch 8 and 16 (~1 min CPU)
    KERAS_BACKEND=jax python -m tasks.dev.bench_gpu [--quick] [--backbones vgg16 resnet50]
        [--batch-sizes 32 64] [--precisions float32 mixed_bfloat16] [--jit auto|off|on|both]
        [--image-size N] [--warmup 2] [--steps 10] [--out reports/bench/gpu.json]

Prints a table and the projection, and writes them with the backend, the devices and
the versions to ``--out`` (default ``reports/bench/gpu.json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass(frozen=True)
class BackboneSpec:
    """A copy of the project's registry entry (tasks/ml/backbones.py), kept import-free."""

    constructor: str
    image_size: int
    min_size: int
    preprocess: str  # tf: [-1, 1]; caffe: BGR minus the ImageNet mean; none: in the backbone
    pooling: str
    dense_units: int
    dropout: float
    unfreeze_from: str
    cut_at: str | None = None


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(
        "MobileNetV2", 160, 32, "tf", "avg", 0, 0.2, "block_11_expand_relu"
    ),
    "inception_v3": BackboneSpec(
        "InceptionV3", 150, 75, "tf", "flatten", 1024, 0.2, "mixed6", cut_at="mixed7"
    ),
    "vgg16": BackboneSpec("VGG16", 224, 32, "caffe", "flatten", 512, 0.5, "block5_conv1"),
    "xception": BackboneSpec("Xception", 150, 71, "tf", "avg", 0, 0.2, "block14_sepconv1"),
    "resnet50": BackboneSpec("ResNet50", 224, 32, "caffe", "avg", 0, 0.2, "conv5_block1_1_conv"),
    "efficientnet_b0": BackboneSpec(
        "EfficientNetB0", 224, 32, "none", "avg", 0, 0.2, "block7a_expand_conv"
    ),
}
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
BATCH_SIZES = (32, 64, 128, 256)
HEAD_LEARNING_RATE = 1e-4
FINETUNE_LEARNING_RATE = 1e-5
JAX_JIT = "always (jax)"
DEFAULT_OUT = Path("reports/bench/gpu.json")


@dataclass(frozen=True)
class Settings:
    """What one invocation measures, after ``--quick`` and the backend's defaults."""

    backbones: tuple[str, ...]
    image_size: int | None
    batch_sizes: tuple[int, ...]
    precisions: tuple[str, ...] | None
    jit: str
    warmup: int
    steps: int
    quick: bool
    out: Path


QUICK = {"backbones": ("mobilenet_v2",), "image_size": 96, "batch_sizes": (8, 16)}
QUICK_STEPS = (1, 3)
FULL_STEPS = (3, 20)


# ---------------------------------------------------------------- projection


@dataclass(frozen=True)
class Pipeline:
    """The cats/dogs run the projection prices."""

    train_images: int = 2000
    val_images: int = 1000
    test_fraction: float = 0.2
    head_epochs: int = 10
    finetune_epochs: int = 10

    @property
    def test_images(self) -> int:
        return round(self.val_images * self.test_fraction)

    @property
    def validation_images(self) -> int:
        return self.val_images - self.test_images

    def record(self) -> dict[str, int]:
        """The run's sizes, as the JSON records them."""
        return {
            "train_images": self.train_images,
            "validation_images": self.validation_images,
            "test_images": self.test_images,
            "head_epochs": self.head_epochs,
            "finetune_epochs": self.finetune_epochs,
        }

    def formula(self) -> str:
        n, v, t = self.train_images, self.validation_images, self.test_images
        return (
            f"T = ({n} + {v})/E + {self.head_epochs}*{n}/H "
            f"+ {self.finetune_epochs}*({n}/F + {v}/E) + {t}/E"
        )


PIPELINE = Pipeline()


def project(extract: float, head: float, finetune: float, pipeline: Pipeline = PIPELINE) -> dict:
    """Seconds of each part of ``pipeline`` at these images/s, and their sum (``seconds``)."""
    n, v, t = pipeline.train_images, pipeline.validation_images, pipeline.test_images
    terms = {
        "extract_features": (n + v) / extract,
        "head_epochs": pipeline.head_epochs * n / head,
        "finetune_epochs": pipeline.finetune_epochs * (n / finetune + v / extract),
        "evaluate": t / extract,
    }
    return {"seconds": sum(terms.values()), "terms": terms}


def best_projections(rows: Sequence[dict], pipeline: Pipeline = PIPELINE) -> list[dict]:
    """Per backbone (in row order), the complete row with the shortest projected time."""
    best: dict[str, dict] = {}
    for row in rows:
        best.setdefault(row["backbone"], {"backbone": row["backbone"]})
        rates = [row.get(key) for key in ("extract_img_s", "head_img_s", "finetune_img_s")]
        if row.get("error") or row.get("skipped") or not all(rates):
            continue
        projected = project(*rates, pipeline=pipeline)
        current = best[row["backbone"]]
        if "seconds" not in current or projected["seconds"] < current["seconds"]:
            best[row["backbone"]] = {
                "backbone": row["backbone"],
                "seconds": projected["seconds"],
                "terms": projected["terms"],
                "config": {
                    key: row[key] for key in ("image_size", "precision", "jit", "batch_size")
                },
                "rates": dict(zip(("extract", "head", "finetune"), rates, strict=True)),
            }
    for entry in best.values():
        if "seconds" not in entry:
            entry["error"] = "no configuration completed"
    return list(best.values())


# ---------------------------------------------------------------- output


COLUMNS = (
    ("backend", "backend", "<"),
    ("device", "device", "<"),
    ("backbone", "backbone", "<"),
    ("size", "image_size", ">"),
    ("precision", "precision", "<"),
    ("jit", "jit", "<"),
    ("batch", "batch_size", ">"),
    ("extract img/s", "extract_img_s", ">"),
    ("head img/s", "head_img_s", ">"),
    ("finetune img/s", "finetune_img_s", ">"),
    ("note", "note", "<"),
)


def _cell(row: dict, key: str) -> str:
    if key == "note":
        return row.get("error") or row.get("skipped") or row.get("note") or ""
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width table, one line per row (rows carry ``backend`` and ``device``)."""
    cells = [[_cell(row, key) for _, key, _ in COLUMNS] for row in rows]
    widths = [
        max([len(title)] + [len(line[i]) for line in cells])
        for i, (title, _, _) in enumerate(COLUMNS)
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            f"{value:{align}{width}}"
            for value, width, (_, _, align) in zip(values, widths, COLUMNS, strict=True)
        ]
        return "  ".join(parts).rstrip()

    header = line([title for title, _, _ in COLUMNS])
    return "\n".join([header, "-" * len(header), *(line(values) for values in cells)])


def format_projection(projections: Sequence[dict], pipeline: Pipeline = PIPELINE) -> str:
    p = pipeline
    lines = [
        f"Projected cats/dogs pipeline ({p.train_images} train, {p.validation_images} "
        f"validation, {p.test_images} test images; {p.head_epochs} head + "
        f"{p.finetune_epochs} fine-tune epochs), fastest configuration per backbone:"
    ]
    for entry in projections:
        if "seconds" not in entry:
            lines.append(f"  {entry['backbone']:<16} {entry['error']}")
            continue
        config = entry["config"]
        minutes, seconds = divmod(entry["seconds"], 60)
        lines.append(
            f"  {entry['backbone']:<16} {entry['seconds']:>9.1f} s "
            f"({int(minutes)}m{seconds:04.1f}s)  {config['precision']}, jit {config['jit']}, "
            f"batch {config['batch_size']}, {config['image_size']} px"
        )
    lines.append(f"  {p.formula()}")
    lines.append("  E, H, F: extract, head, finetune images/s; loading and augmentation excluded.")
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number; e.g. 32")
    return value


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.dev.bench_gpu",
        description="images/s of feature extraction, head training and fine-tuning per "
        "backbone, precision, jit and batch size; projected cats/dogs pipeline time",
    )
    parser.add_argument("--quick", action="store_true", help="a minute-sized run (CPU in CI)")
    parser.add_argument("--backbones", nargs="+", choices=list(BACKBONES), metavar="BACKBONE")
    parser.add_argument("--batch-sizes", nargs="+", type=_positive_int, metavar="N")
    parser.add_argument("--image-size", type=_positive_int, help="px; default per backbone")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, metavar="PRECISION")
    parser.add_argument(
        "--jit",
        choices=("auto", "off", "on", "both"),
        default="auto",
        help="auto: off and on (XLA) on tensorflow with a GPU/TPU, else off; JAX always jits",
    )
    parser.add_argument("--warmup", type=_positive_int, help="untimed steps per phase")
    parser.add_argument("--steps", type=_positive_int, help="timed steps per phase")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    quick = args.quick
    backbones = tuple(dict.fromkeys(args.backbones or (QUICK["backbones"] if quick else BACKBONES)))
    image_size = args.image_size or (QUICK["image_size"] if quick else None)
    if image_size is not None:
        for name in backbones:
            if image_size < BACKBONES[name].min_size:
                parser.error(
                    f"--image-size {image_size} is too small for {name}; use at least "
                    f"{BACKBONES[name].min_size} (default {BACKBONES[name].image_size})"
                )
    batch_sizes = args.batch_sizes or (QUICK["batch_sizes"] if quick else BATCH_SIZES)
    warmup, steps = QUICK_STEPS if quick else FULL_STEPS
    return Settings(
        backbones=backbones,
        image_size=image_size,
        batch_sizes=tuple(dict.fromkeys(batch_sizes)),
        precisions=tuple(dict.fromkeys(args.precisions)) if args.precisions else None,
        jit=args.jit,
        warmup=args.warmup or warmup,
        steps=args.steps or steps,
        quick=quick,
        out=args.out,
    )


def jit_settings(backend: str, jit: str, accelerator: bool) -> list[bool | str]:
    """The jit values to measure: JAX always compiles; torch's ``True`` is torch.compile;
    ``auto`` measures XLA on TensorFlow only with an accelerator (slower on CPU)."""
    if backend == "jax":
        return [JAX_JIT]
    if jit == "auto":
        jit = "both" if backend == "tensorflow" and accelerator else "off"
    return {"off": [False], "on": [True], "both": [False, True]}[jit]


FLOAT16_ON_CPU = "skipped: CPUs have no fast float16 math (ask with --precisions mixed_float16)"


# ---------------------------------------------------------------- devices


def device_names(backend: str) -> list[str]:
    """Model names of the accelerators the backend sees, or ``["cpu"]``."""
    try:
        if backend == "jax":
            import jax

            names = [d.device_kind for d in jax.devices() if d.platform != "cpu"]
            return names or ["cpu"]
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            return ["cpu"]
        if backend == "tensorflow":
            tf = sys.modules.get("tensorflow")  # loaded by Keras itself on this backend
            if tf is not None:
                gpus = tf.config.list_physical_devices("GPU")
                details = tf.config.experimental.get_device_details
                return [details(gpu).get("device_name", gpu.name) for gpu in gpus] or ["cpu"]
    except Exception as error:  # noqa: BLE001 - a missing driver must not stop the bench
        return [f"unknown ({type(error).__name__})"]
    return ["cpu"]


def backend_version(backend: str) -> str:
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend)
    loaded = sys.modules.get(module) if module else None
    return str(getattr(loaded, "__version__", "unknown"))


# ---------------------------------------------------------------- measuring


def images_per_second(
    step: Callable[..., Any], inputs: tuple, batch: int, warmup: int, steps: int
) -> float:
    """``batch * steps / seconds`` of ``steps`` calls of ``step(*inputs)`` after ``warmup``."""
    for _ in range(warmup):
        step(*inputs)
    start = time.perf_counter()
    for _ in range(steps):
        step(*inputs)
    return batch * steps / (time.perf_counter() - start)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def build_models(keras: Any, name: str, size: int, jit: bool | str) -> dict[str, Any]:
    """The extractor, the phase-1 head and the fine-tune model, compiled, under the policy."""
    spec = BACKBONES[name]
    ops = keras.ops
    backbone = _backbone(keras, spec, size)

    def preprocess(x: Any) -> Any:
        if spec.preprocess == "tf":
            return x / 127.5 - 1.0
        if spec.preprocess == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, "float32")
        return x

    feature_shape = tuple(int(d) for d in backbone.output.shape[1:])
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Lambda(preprocess, dtype="float32", name="preprocess")(inputs)
    features = backbone(x, training=False)
    extractor = keras.Model(inputs, features, name="extractor")
    finetune = keras.Model(inputs, _head(keras, spec, feature_shape)(features), name="finetune")
    phase1 = _head(keras, spec, feature_shape)

    flag = True if jit == JAX_JIT else jit
    extractor.compile(jit_compile=flag)
    for model, rate in ((phase1, HEAD_LEARNING_RATE), (finetune, FINETUNE_LEARNING_RATE)):
        model.compile(
            optimizer=keras.optimizers.RMSprop(learning_rate=rate),
            loss="binary_crossentropy",
            metrics=["accuracy"],
            jit_compile=flag,
        )
    return {
        "extractor": extractor,
        "head": phase1,
        "finetune": finetune,
        "feature_shape": feature_shape,
    }


def _backbone(keras: Any, spec: BackboneSpec, size: int) -> Any:
    """The cut backbone with random weights, its layers from ``unfreeze_from`` on trainable
    (BatchNormalization excepted)."""
    constructor = getattr(keras.applications, spec.constructor)
    full = constructor(include_top=False, weights=None, input_shape=(size, size, 3))
    output = full.get_layer(spec.cut_at).output if spec.cut_at else full.output
    backbone = keras.Model(full.input, output, name="backbone")
    names = [layer.name for layer in backbone.layers]
    start = names.index(spec.unfreeze_from)
    backbone.trainable = True
    for index, layer in enumerate(backbone.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= start and not is_bn
    return backbone


def _head(keras: Any, spec: BackboneSpec, feature_shape: tuple[int, ...]) -> Any:
    """The backbone's default head on features of ``feature_shape``."""
    layers: list[Any] = [keras.Input(shape=feature_shape)]
    if spec.pooling == "avg":
        layers.append(keras.layers.GlobalAveragePooling2D())
    else:
        layers.append(keras.layers.Flatten())
    if spec.dense_units:
        layers.append(keras.layers.Dense(spec.dense_units, activation="relu"))
    layers.append(keras.layers.Dropout(spec.dropout))
    layers.append(keras.layers.Dense(1, activation="sigmoid", dtype="float32"))
    return keras.Sequential(layers, name="head")


def unmeasured_row(
    base: dict, name: str, size: int, precision: str, jit: bool | str | None, batch: int | None
) -> dict:
    """A table row for one configuration, its rates still to measure."""
    return {**base, "backbone": name, "image_size": size, "precision": precision, "jit": jit,
            "batch_size": batch, "extract_img_s": None, "head_img_s": None,
            "finetune_img_s": None}  # fmt: skip


def measure_config(
    keras: Any,
    name: str,
    size: int,
    precision: str,
    jit: bool | str,
    settings: Settings,
    base: dict,
) -> list[dict]:
    """One row per batch size for this backbone, precision and jit (errors become rows)."""
    import numpy as np

    rows = [unmeasured_row(base, name, size, precision, jit, b) for b in settings.batch_sizes]
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(precision)
    try:
        started = time.perf_counter()
        try:
            models = build_models(keras, name, size, jit)
        except Exception as error:  # noqa: BLE001 - recorded, the bench goes on
            for row in rows:
                row["error"] = f"build: {one_line(error)}"
            return rows
        build_seconds = time.perf_counter() - started
        effective = models["finetune"].jit_compile
        rng = np.random.default_rng(0)
        for row in rows:
            row["build_s"] = round(build_seconds, 3)
            if jit is not JAX_JIT and bool(effective) != bool(jit):
                row["note"] = f"Keras ran jit_compile={effective}"
            started = time.perf_counter()
            measure_batch(keras, models, row, rng, settings)
            row["seconds"] = round(time.perf_counter() - started, 3)
        return rows
    finally:
        keras.mixed_precision.set_global_policy("float32")
        keras.backend.clear_session()
        release_memory(keras.backend.backend())


def measure_batch(
    keras: Any, models: dict[str, Any], row: dict, rng: Any, settings: Settings
) -> None:
    """``row``'s three rates at its batch size, on random inputs already on the device; a
    failure (e.g. out of memory at this batch) is the row's ``error``."""
    batch, size = row["batch_size"], row["image_size"]
    phase = "inputs"
    try:
        images = keras.ops.convert_to_tensor(
            rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
        )
        labels = keras.ops.convert_to_tensor(rng.integers(0, 2, (batch, 1)).astype("float32"))
        feats = keras.ops.convert_to_tensor(
            rng.uniform(0, 6, (batch, *models["feature_shape"])).astype("float32")
        )
        phases = (
            ("extract", models["extractor"].predict_on_batch, (images,)),
            ("head", models["head"].train_on_batch, (feats, labels)),
            ("finetune", models["finetune"].train_on_batch, (images, labels)),
        )
        for phase, step, inputs in phases:
            row[f"{phase}_img_s"] = images_per_second(
                step, inputs, batch, settings.warmup, settings.steps
            )
    except Exception as error:  # noqa: BLE001 - e.g. out of memory at this batch
        row["error"] = f"{phase}: {one_line(error)}"


def release_memory(backend: str) -> None:
    """Free what the last configuration held, so an out-of-memory one does not spill over."""
    gc.collect()
    torch = sys.modules.get("torch")
    if backend == "torch" and torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_label(devices: Sequence[str]) -> str:
    """The device column: the one model (and how many of it), or every name."""
    if len(set(devices)) != 1:
        return ", ".join(devices)
    return f"{devices[0]} (1 of {len(devices)})" if len(devices) > 1 else devices[0]


def run(settings: Settings) -> dict:
    """Measure everything ``settings`` asks for; returns the JSON payload (also printed)."""
    import keras

    started = time.perf_counter()
    backend = keras.backend.backend()
    devices = device_names(backend)
    accelerator = devices != ["cpu"]
    device = device_label(devices)
    base = {"backend": backend, "device": device}
    precisions = list(settings.precisions or PRECISIONS)
    jits = jit_settings(backend, settings.jit, accelerator)
    rows: list[dict] = []
    for name in settings.backbones:
        size = settings.image_size or BACKBONES[name].image_size
        for precision in precisions:
            if precision == "mixed_float16" and not accelerator and settings.precisions is None:
                skipped = unmeasured_row(base, name, size, precision, None, None)
                rows.append({**skipped, "skipped": FLOAT16_ON_CPU})
                continue
            for jit in jits:
                print(f"... {name} {size}px {precision} jit={jit}", file=sys.stderr, flush=True)
                rows.extend(measure_config(keras, name, size, precision, jit, settings, base))
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "backend": backend,
        "backend_version": backend_version(backend),
        "device": device,
        "devices": devices,
        "python": platform.python_version(),
        "keras": keras.__version__,
        "platform": platform.platform(),
        "args": {
            "quick": settings.quick,
            "backbones": list(settings.backbones),
            "image_size": settings.image_size,
            "batch_sizes": list(settings.batch_sizes),
            "precisions": precisions,
            "jit": jits,
            "warmup": settings.warmup,
            "steps": settings.steps,
            "out": str(settings.out),
        },
        "rows": rows,
        "projection": {
            "pipeline": PIPELINE.record(),
            "formula": PIPELINE.formula(),
            "backbones": best_projections(rows),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    payload = run(settings)
    print(format_table(payload["rows"]))
    print()
    print(format_projection(payload["projection"]["backbones"]))
    write_json(settings.out, payload)
    print(f"\nwrote {settings.out} ({payload['seconds']:.0f} s)")
    if not any(row.get("finetune_img_s") for row in payload["rows"]):
        print("error: no configuration completed; see the note column", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
