"""The backbone registry: one entry per ``train.backbone``, and where its weights come from.

Each :class:`Backbone` names its ``keras.applications`` constructor, default
input size, the ``preprocess_input`` mode the saved model applies inside itself
(so a saved model takes raw 0-255 RGB), its default head, and the named layer
where fine-tuning starts unfreezing (``unfreeze_from``: that layer and every
layer after it in the backbone's layer order; BatchNormalization stays frozen).

A Keras model file can be the backbone too (``train.backbone: <path>.keras``):
its entry comes from :func:`tasks.ml.backbone_file.backbone_entry` and builds
from the file; ``train.weights: imagenet`` then means the file's own weights.

Weights (``train.weights``):

- ``imagenet``: the official ``*_notop.h5`` file in the Keras cache
  (``$KERAS_HOME/models``, else ``~/.keras/models``). The cache is checked
  *before* Keras is asked, so no network call happens when the file is there,
  and a missing file is a :class:`StageError` naming the exact file, the folder
  and how to pre-seed it (``python -m tasks fetch-weights <backbone>`` on a
  connected machine, or copy the file there).
- a path to a ``.weights.h5`` file saved by Keras from the backbone (e.g. by
  ``tasks.dev.offline_weights``), or to an official legacy ``*_notop.h5``
  (loaded by the ``keras.applications`` constructor; for EfficientNet through
  its ImageNet graph, which adds the input scaling those weights expect);
- ``none``: random initialisation (structure tests only: BatchNorm backbones
  give collapsed features without trained statistics).

Weights made without a network, for tests and the demo, come from
``tasks.dev.offline_weights`` (a developer tool, not part of the pipeline).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tasks.config import BACKBONES as BACKBONE_NAMES
from tasks.config import HeadConfig
from tasks.errors import ConfigError, StageError
from tasks.io import sha256_file

if TYPE_CHECKING:
    import keras

UNFREEZE_ALL = "all"
_MOBILENET_SIZES = (96, 128, 160, 192, 224)


@dataclass(frozen=True)
class HeadSpec:
    """The classifier on top of the backbone: pooling, optional hidden layer, dropout (0: none)."""

    pooling: Literal["avg", "flatten"]
    dense_units: int
    dropout: float

    def __str__(self) -> str:
        return self.describe()

    def describe(self, pooled: bool = True) -> str:
        """The layers, e.g. ``Flatten -> Dense(512, relu) -> Dropout(0.5) -> Dense``;
        ``pooled`` False: features that are one vector per image, so no pooling layer."""
        pool = ["GlobalAveragePooling2D" if self.pooling == "avg" else "Flatten"] if pooled else []
        hidden = [f"Dense({self.dense_units}, relu)"] if self.dense_units else []
        dropout = [f"Dropout({self.dropout})"] if self.dropout else []
        return " -> ".join([*pool, *hidden, *dropout, "Dense"])


@dataclass(frozen=True)
class Backbone:
    """One registry entry (see the module docstring)."""

    name: str
    constructor: str
    image_size: int
    min_size: int
    preprocess: Literal["tf", "caffe", "torch", "none"]
    head: HeadSpec
    unfreeze_from: str
    cut_at: str | None = None
    imagenet_graph: bool = False
    """The constructor builds a different graph for ImageNet weights (EfficientNet)."""
    file: Path | None = None
    """The Keras model file this backbone comes from (None: ``keras.applications``)."""
    fixed_size: bool = False
    """The model file's input takes ``image_size`` px only."""

    @property
    def model_name(self) -> str:
        """The name part of the classifier's Keras name (``<model_name>_classifier``); a
        model file's is marked, so a file named like a registry entry is not taken for it."""
        name = re.sub(r"[^A-Za-z0-9_]", "_", self.name)
        return f"{name}_file" if self.file is not None else name

    def weights_file(self, image_size: int) -> str:
        """File name of the official ImageNet no-top weights for this input size."""
        if self.name == "mobilenet_v2":
            rows = image_size if image_size in _MOBILENET_SIZES else 224
            return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"
        if self.name == "efficientnet_b0":
            return "efficientnetb0_notop.h5"
        return f"{self.name}_weights_tf_dim_ordering_tf_kernels_notop.h5"

    def head_spec(self, override: HeadConfig | None = None) -> HeadSpec:
        """The default head with any non-null ``train.head`` keys applied."""
        if override is None:
            return self.head
        return HeadSpec(
            pooling=override.pooling or self.head.pooling,
            dense_units=(
                self.head.dense_units if override.dense_units is None else override.dense_units
            ),
            dropout=self.head.dropout if override.dropout is None else override.dropout,
        )

    def resolve_size(self, image_size: int | None) -> int:
        size = image_size or self.image_size
        if self.fixed_size and size != self.image_size:
            raise ConfigError(
                f"train.image_size: {size} px, but {self.name} takes {self.image_size} px "
                "inputs only (its input layer is fixed); set train.image_size to "
                f"{self.image_size} or null"
            )
        if size < self.min_size:
            raise ConfigError(
                f"train.image_size: {size} px is too small for {self.name}; "
                f"use at least {self.min_size} (default {self.image_size})"
            )
        return size

    def build(self, image_size: int, weights: WeightsSource) -> keras.Model:
        """This entry's feature extractor (:func:`build_backbone`): ``keras.applications``;
        a model file's entry builds from its file instead."""
        return _from_applications(self, image_size, weights)


BACKBONES: dict[str, Backbone] = {
    "mobilenet_v2": Backbone(
        "mobilenet_v2",
        "MobileNetV2",
        160,
        32,
        "tf",
        HeadSpec("avg", 0, 0.2),
        # index 100 of the Keras 3.15 model, as in the TensorFlow tutorial's fine_tune_at = 100
        unfreeze_from="block_11_expand_relu",
    ),
    "inception_v3": Backbone(
        "inception_v3",
        "InceptionV3",
        150,
        75,
        "tf",
        HeadSpec("flatten", 1024, 0.2),
        # mixed6 has no weights: from it on is exactly the last block before the cut (mixed7)
        unfreeze_from="mixed6",
        cut_at="mixed7",
    ),
    "vgg16": Backbone(
        "vgg16", "VGG16", 224, 32, "caffe", HeadSpec("flatten", 512, 0.5), "block5_conv1"
    ),
    "xception": Backbone(
        "xception", "Xception", 150, 71, "tf", HeadSpec("avg", 0, 0.2), "block14_sepconv1"
    ),
    "resnet50": Backbone(
        "resnet50", "ResNet50", 224, 32, "caffe", HeadSpec("avg", 0, 0.2), "conv5_block1_1_conv"
    ),
    "efficientnet_b0": Backbone(
        "efficientnet_b0",
        "EfficientNetB0",
        224,
        32,
        "none",
        HeadSpec("avg", 0, 0.2),
        "block7a_expand_conv",
        imagenet_graph=True,
    ),
}
assert tuple(BACKBONES) == BACKBONE_NAMES, "tasks.config.BACKBONES and the registry disagree"


def get_backbone(name: str | Backbone) -> Backbone:
    """The registry entry ``name`` (an entry passes through as it is)."""
    if isinstance(name, Backbone):
        return name
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(
            f"train.backbone: {name!r} is not allowed; use one of: {', '.join(BACKBONES)}"
        ) from None


def local_file(setting: str, root: Path | None, problem: str, fix: str) -> Path:
    """``setting`` as an existing file: absolute, or under ``root`` then the current folder."""
    path = Path(setting).expanduser()
    candidates = [path] if path.is_absolute() else [Path(root or ".") / path, path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise StageError(f"{problem} (looked in {', '.join(map(str, candidates))}); {fix}")


# ---------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightsSource:
    """Where the backbone's weights come from, as recorded with every run."""

    kind: Literal["imagenet", "file", "model_file", "none"]
    path: Path | None = None
    sha256: str = "none"

    @property
    def description(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "imagenet":
            return f"imagenet ({self.path})"
        if self.kind == "model_file":
            return f"{self.path} (the backbone file's own weights)"
        return str(self.path)


def keras_cache_dir() -> Path:
    """Where Keras caches downloaded weights: ``$KERAS_HOME/models`` or ``~/.keras/models``.

    Mirrors ``keras.utils.get_file`` (an unwritable base falls back to ``/tmp/.keras``).
    """
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        if not os.access(base, os.W_OK):
            base = "/tmp"
        home = os.path.join(base, ".keras")
    home = os.path.expanduser(home)
    if os.path.isdir(home) and not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return Path(home) / "models"


def fetch_command(backbone: str, image_size: int) -> str:
    spec = get_backbone(backbone)
    suffix = ""
    if backbone == "mobilenet_v2" and spec.weights_file(image_size) != spec.weights_file(
        spec.image_size
    ):
        suffix = f":{image_size}"
    return f"python -m tasks fetch-weights {backbone}{suffix}"


def resolve_weights(
    setting: str, backbone: str | Backbone, image_size: int, root: Path | None = None
) -> WeightsSource:
    """Turn ``train.weights`` into a concrete file (checked to exist) and its sha256.

    Never touches the network: ``imagenet`` must already be in the Keras cache
    (for a model-file backbone, ``imagenet`` is the file's own weights).
    A relative path is looked up under ``root`` (the workspace), then the current folder.
    """
    spec = get_backbone(backbone)
    if setting == "none":
        return WeightsSource("none")
    if setting == "imagenet" and spec.file is not None:
        return WeightsSource("model_file", spec.file, sha256_file(spec.file))
    if setting == "imagenet":
        name = spec.weights_file(image_size)
        cache = keras_cache_dir()
        file = cache / name
        if not file.is_file():
            raise StageError(
                f"imagenet weights for {spec.name} are not in the Keras cache: expected {name} "
                f"in {cache}; pre-seed it on a connected machine with "
                f"`{fetch_command(spec.name, image_size)}` (KERAS_HOME={cache.parent}), "
                "or copy the file there"
            )
        return WeightsSource("imagenet", file, sha256_file(file))
    found = local_file(
        setting,
        root,
        f"train.weights: file {setting} not found",
        "give an existing .weights.h5 or *_notop.h5 path, imagenet or none",
    )
    return WeightsSource("file", found, sha256_file(found))


def fetch_weights(backbone: str) -> FetchResult:
    """``python -m tasks fetch-weights <backbone>[:<size>]``: download the ImageNet no-top
    weights into the Keras cache (run on a connected machine; offline stages then find them).
    """
    name, _, size_text = backbone.partition(":")
    spec = get_backbone(name)
    try:
        size = int(size_text) if size_text else spec.image_size
    except ValueError:
        raise ConfigError(
            f"fetch-weights: {backbone!r}: write BACKBONE or BACKBONE:SIZE, e.g. mobilenet_v2:224"
        ) from None
    size = spec.resolve_size(size)
    import keras

    constructor = getattr(keras.applications, spec.constructor)
    try:
        constructor(include_top=False, weights="imagenet", input_shape=(size, size, 3))
    except Exception as error:  # noqa: BLE001 - network/HTTP errors come in many types
        raise StageError(
            f"cannot download the {name} weights ({type(error).__name__}: {error}); check the "
            f"network, or copy {spec.weights_file(size)} into {keras_cache_dir()}"
        ) from None
    source = resolve_weights("imagenet", name, size)
    return FetchResult(name, source.path, source.sha256)


@dataclass(frozen=True)
class FetchResult:
    backbone: str
    path: Path | None
    sha256: str

    def __str__(self) -> str:
        return f"{self.backbone}: {self.path} (sha256 {self.sha256})"


# ---------------------------------------------------------------- building


def build_backbone(
    backbone: str | Backbone, image_size: int, weights: WeightsSource | None = None
) -> keras.Model:
    """The functional feature extractor named ``backbone`` (InceptionV3 cut at ``mixed7``).

    ``.weights.h5`` files are loaded into the (cut) backbone as saved by Keras;
    legacy ``*.h5`` files (the official ImageNet ones) go through the constructor.
    A model-file entry is rebuilt from its file
    (:class:`tasks.ml.backbone_file.FileBackbone`).
    """
    return get_backbone(backbone).build(image_size, weights or WeightsSource("none"))


def _from_applications(spec: Backbone, image_size: int, weights: WeightsSource) -> keras.Model:
    """``spec``'s ``keras.applications`` model without its top, cut at ``spec.cut_at``."""
    import keras

    constructor = getattr(keras.applications, spec.constructor)
    legacy = weights.path is not None and not weights.path.name.endswith(".weights.h5")
    shape = (image_size, image_size, 3)
    try:
        if legacy and spec.imagenet_graph:
            with _weights_from(weights.path):
                full = constructor(include_top=False, weights="imagenet", input_shape=shape)
        else:
            full = constructor(
                include_top=False, weights=str(weights.path) if legacy else None, input_shape=shape
            )
    except (ValueError, OSError) as error:
        raise StageError(
            f"cannot load {spec.name} weights from {weights.path}: {error}; use the matching "
            f"{spec.weights_file(image_size)} (no top) or a .weights.h5 saved from this backbone"
        ) from None
    output = full.get_layer(spec.cut_at).output if spec.cut_at else full.output
    model = keras.Model(full.input, output, name="backbone")
    if weights.path is not None and not legacy:
        load_weights_file(
            model,
            full,
            weights.path,
            spec.name,
            f"make it with make_offline_weights('{spec.name}', ...) or save it from this backbone",
        )
    return model


@contextmanager
def _weights_from(path: Path) -> Iterator[None]:
    """Make ``weights="imagenet"`` load ``path`` (no download, no cache lookup).

    EfficientNet's graph differs with ImageNet weights (an extra input rescaling
    the official weights expect), so those weights must be loaded that way.
    """
    from keras.src.utils import file_utils

    original = file_utils.get_file
    file_utils.get_file = lambda *args, **kwargs: str(path)
    try:
        yield
    finally:
        file_utils.get_file = original


def load_weights_file(
    model: keras.Model, full: keras.Model, path: Path, name: str, fix: str
) -> None:
    """Load a Keras ``.weights.h5`` saved from the backbone ``model``, or from the whole
    uncut ``full`` (whose layers it shares); one that fits neither is a :class:`StageError`
    that ends in ``fix``."""
    try:
        try:
            model.load_weights(str(path))
        except (ValueError, OSError, KeyError):
            if model.layers == full.layers:
                raise
            full.load_weights(str(path))  # the cut model shares these layers
    except (ValueError, OSError, KeyError) as error:
        raise StageError(f"{path} does not fit the {name} backbone ({error}); {fix}") from None


def boundary_index(backbone: keras.Model, unfreeze_from: str) -> int:
    """Index in ``backbone.layers`` of the first layer fine-tuning unfreezes."""
    if unfreeze_from == UNFREEZE_ALL:
        return 0
    names = [layer.name for layer in backbone.layers]
    if unfreeze_from in names:
        return names.index(unfreeze_from)
    raise StageError(
        f"finetune.unfreeze_from: no layer {unfreeze_from!r} in the backbone; nearby valid "
        f"names: {nearby_names(unfreeze_from, names)} (or '{UNFREEZE_ALL}')"
    )


def nearby_names(name: str, names: list[str]) -> str:
    """Up to five of ``names`` close to ``name`` (else the last five), for an error message."""
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    near = near or [other for other in names if other[:5] == name[:5]][:5]
    return ", ".join(near) if near else ", ".join(names[-5:])


def is_batch_norm(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def unfreeze_top_blocks(backbone: keras.Model, unfreeze_from: str) -> list[str]:
    """Make ``unfreeze_from`` and every later layer trainable, BatchNormalization excepted.

    Returns the names of the layers with weights that became trainable. The
    caller must recompile the model afterwards.
    """
    start = boundary_index(backbone, unfreeze_from)
    backbone.trainable = True
    unfrozen = []
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= start and not is_batch_norm(layer)
        if layer.trainable and layer.trainable_weights:
            unfrozen.append(layer.name)
    return unfrozen
