from __future__ import annotations

from tasks.config import parse_config
from tasks.tracking.lineage import flat_params
from tests.datagen import tiny_params


def test_param_names_do_not_depend_on_backbone(cfg):
    other = parse_config(
        tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}), ["train.backbone=vgg16"]
    )
    assert flat_params(cfg, "x").keys() == flat_params(other, "x").keys()
    assert flat_params(cfg, "x")["train.epochs"] == 3
    assert flat_params(cfg, "x")["train.head.dropout"] is None
