"""A Keras model file as the backbone (``train.backbone: <path>.keras``).

For an architecture ``keras.applications`` lacks (an AlexNet port, a model
trained in-house): :func:`backbone_entry` makes its entry from
``train.backbone_file`` (``cut_at``, ``unfreeze_from``, ``preprocess``) and the
input size read from the file, and that entry (a :class:`FileBackbone`) builds
as the file's graph rebuilt at the run's image size with the file's weights, cut
at ``cut_at``. Layer names are those at the file model's top level.
``train.weights: imagenet`` then means the file's own weights (a port of an
ImageNet model carries them); fine-tuning starts at
``train.backbone_file.unfreeze_from`` (:func:`default_boundary`).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import TrainConfig
from tasks.errors import StageError
from tasks.ml.backbones import (
    UNFREEZE_ALL,
    Backbone,
    HeadSpec,
    WeightsSource,
    get_backbone,
    load_weights_file,
    local_file,
    nearby_names,
)

if TYPE_CHECKING:
    import keras

_FILE_DEFAULT_SIZE = 224


@dataclass(frozen=True)
class FileBackbone(Backbone):
    """The entry of a Keras model file (``file`` set): it builds from the file."""

    def build(self, image_size: int, weights: WeightsSource) -> keras.Model:
        """The file's model rebuilt on a (size, size, 3) input, cut at ``cut_at``.

        Its weights: the file's own (``model_file``), fresh ones (``none``), or a
        ``.weights.h5`` loaded into the cut backbone.
        """
        import keras

        model = _rebuilt_at(self, _load_model_file(self), image_size, weights)
        backbone = keras.Model(model.inputs[0], _cut_output(self, model), name="backbone")
        if weights.kind == "file" and weights.path is not None:
            load_weights_file(
                backbone,
                model,
                weights.path,
                self.name,
                "save it from this backbone, or set train.weights: imagenet to use the file's "
                "own weights",
            )
        return backbone


def backbone_entry(train: TrainConfig, root: Path | None = None) -> Backbone:
    """The entry ``train.backbone`` names: the registry's, or one made for its model file.

    A relative file path is looked up under ``root`` (the workspace), then the
    current folder. The file's input size, when fixed, is the only size it takes.
    """
    if not train.backbone_is_file:
        return get_backbone(train.backbone)
    path = local_file(
        train.backbone,
        root,
        f"train.backbone: model file {train.backbone} not found",
        "`dvc pull` it, or give the path of an existing .keras file",
    )
    size = model_file_input_size(path)
    settings = train.backbone_file
    return FileBackbone(
        name=train.backbone_name,
        constructor="",
        image_size=size or _FILE_DEFAULT_SIZE,
        min_size=size or 32,
        preprocess=settings.preprocess or "none",
        head=HeadSpec("avg", 0, 0.2),
        unfreeze_from=settings.unfreeze_from or UNFREEZE_ALL,
        cut_at=settings.cut_at,
        file=path,
        fixed_size=size is not None,
    )


def default_boundary(backbone: str, train: TrainConfig) -> str:
    """Where fine-tuning starts for a model built on ``backbone`` (a registry name, or
    ``train.backbone`` itself when that is a model file) unless ``finetune.unfreeze_from``
    says otherwise."""
    if backbone == train.backbone and train.backbone_is_file:
        return train.backbone_file.unfreeze_from or UNFREEZE_ALL
    return get_backbone(backbone).unfreeze_from


def model_file_input_size(path: Path) -> int | None:
    """The square input size a ``.keras`` file's model is fixed to (None: any size).

    Read from the archive's ``config.json``, without building the model.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError):
        raise StageError(
            f"{path} is not a Keras 3 .keras file (a zip with config.json); save the model "
            "with model.save('<name>.keras') in Keras 3"
        ) from None
    shape = _first_input_shape(config)
    if not shape or len(shape) != 4 or shape[-1] != 3:
        raise StageError(
            f"{path}: the model's input is {shape}; a backbone takes (batch, height, width, 3) "
            "RGB images"
        )
    height, width = shape[1], shape[2]
    if height is None and width is None:
        return None
    if height != width:
        raise StageError(
            f"{path}: the model's input is fixed to {height}x{width}; the pipeline makes square "
            "images, so rebuild it with a square or unspecified (None, None, 3) input"
        )
    return int(height)


def _first_input_shape(node: Any) -> list[Any] | None:
    if isinstance(node, dict):
        inner = node.get("config")
        if node.get("class_name") == "InputLayer" and isinstance(inner, dict):
            shape = inner.get("batch_shape") or inner.get("batch_input_shape")
            return list(shape) if shape else None
        children = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        shape = _first_input_shape(child)
        if shape is not None:
            return shape
    return None


def _load_model_file(spec: FileBackbone) -> keras.Model:
    """The file's model as saved: one image input, built-in layers only."""
    import keras

    assert spec.file is not None
    try:
        full = keras.saving.load_model(spec.file, compile=False)
    except Exception as error:  # noqa: BLE001 - deserialisation fails in many types
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise StageError(
            f"cannot load {spec.file} as a Keras model ({type(error).__name__}: {reason}); "
            "save it from Keras 3 with built-in layers only (no custom or Lambda layers)"
        ) from None
    if len(full.inputs) != 1:
        raise StageError(f"{spec.file} takes {len(full.inputs)} inputs; a backbone takes one image")
    return full


def _rebuilt_at(
    spec: FileBackbone, full: keras.Model, image_size: int, weights: WeightsSource
) -> keras.Model:
    """``full``'s graph on a (size, size, 3) input; its weights unless ``weights`` is none."""
    import keras

    try:
        model = keras.models.clone_model(
            full, input_tensors=keras.Input((image_size, image_size, 3))
        )
        if weights.kind != "none":
            model.set_weights(full.get_weights())
    except ValueError as error:
        first = str(error).strip().splitlines()[0][:200]
        raise StageError(
            f"{spec.file} does not run at {image_size} px ({first}); set train.image_size to "
            "the size it was built for"
        ) from None
    return model


def _cut_output(spec: FileBackbone, model: keras.Model) -> Any:
    """The output of layer ``cut_at`` (None: the model's one output) the head reads."""
    assert spec.file is not None
    names = [layer.name for layer in model.layers]
    if spec.cut_at is not None and spec.cut_at not in names:
        raise StageError(
            f"train.backbone_file.cut_at: no layer {spec.cut_at!r} in {spec.file.name}; nearby "
            f"valid names: {nearby_names(spec.cut_at, names)} (or null for the model's output)"
        )
    output = model.get_layer(spec.cut_at).output if spec.cut_at else model.outputs
    if isinstance(output, list) and len(output) != 1:
        raise StageError(
            f"{spec.file} has {len(output)} outputs; set train.backbone_file.cut_at to the layer "
            "whose output the head should read"
        )
    return output
