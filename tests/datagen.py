"""Tiny generated image datasets for the tests (the generator lives in ``tasks.dev.synthetic``,
which ``make demo`` uses too)."""

from tasks.dev.synthetic import LAYOUTS, make_archive, make_image, make_tree, tiny_params

__all__ = ["LAYOUTS", "learnable_train", "make_archive", "make_image", "make_tree", "tiny_params"]


def learnable_train(weights: object) -> dict:
    """``train:`` settings the tiny generated data learns with (test accuracy 1.0 measured):
    MobileNetV2 at 32 px on offline-made ``weights``, 15 head epochs at Adam 0.003."""
    return {
        "backbone": "mobilenet_v2",
        "image_size": 32,
        "weights": str(weights),
        "epochs": 15,
        "optimizer": "adam",
        "learning_rate": 0.003,
        "batch_size": 8,
    }
