from __future__ import annotations

import yaml

from tasks.config import parse_config
from tasks.paths import DatasetPaths
from tasks.tracking.lineage import flat_params, lineage_tags
from tests.datagen import tiny_params


def test_param_names_do_not_depend_on_backbone(cfg):
    other = parse_config(
        tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}), ["train.backbone=vgg16"]
    )
    assert flat_params(cfg, "x").keys() == flat_params(other, "x").keys()
    assert flat_params(cfg, "x")["train.epochs"] == 3
    assert flat_params(cfg, "x")["train.head.dropout"] is None


def test_the_data_tags_are_the_dvc_lock_hashes_of_the_archive_and_the_shards(cfg, tmp_path):
    paths = DatasetPaths.of("cats_vs_dogs", tmp_path)
    assert "data.raw_dvc_hash" not in lineage_tags(cfg, paths)  # outside DVC: no tag
    lock = {
        "stages": {
            "download@cats_vs_dogs": {"outs": [{"path": "data/raw/cats_vs_dogs", "md5": "a.dir"}]},
            "validate@cats_vs_dogs": {
                "outs": [
                    {"path": "data/manifests/cats_vs_dogs.parquet", "md5": "m"},
                    {"path": "data/shards/cats_vs_dogs", "md5": "s.dir"},
                ]
            },
        }
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    tags = lineage_tags(cfg, paths)
    assert tags["data.raw_dvc_hash"] == "a.dir" and tags["data.shards_dvc_hash"] == "s.dir"
