"""Both phases under ``tf.distribute.MirroredStrategy``, on two logical CPU devices.

The stage processes start with the CPU split in two (as a two-GPU node looks to
TensorFlow), train with ``train.distribute=mirrored`` and with ``none``, and are
compared: the mirrored run must train on both replicas (global batch and
learning rate scaled by the replica count) and reach the single-device result
within 0.15 validation accuracy on this tiny, learnable data.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.datagen import tiny_params
from tests.model.conftest import make_workspace

pytestmark = pytest.mark.slow

TWO_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tasks.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_both_phases(root, params, distribute: str) -> None:
    for stage in ("train", "finetune"):
        done = subprocess.run(
            [sys.executable, "-c", TWO_CPUS, stage, "cats_vs_dogs", "--params", str(params),
             "--root", str(root), "--set", f"train.distribute={distribute}"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]


def test_mirrored_training_matches_one_device(tmp_path, offline_weights, tracking):
    from mlflow.tracking import MlflowClient

    params = tmp_path / "params.yaml"
    train = {"weights": str(offline_weights), "epochs": 15, "batch_size": 8}
    train |= {"optimizer": "adam", "learning_rate": 0.003, "feature_cache": "auto"}
    params.write_text(
        yaml.safe_dump(
            tiny_params(
                {"cats_vs_dogs": "http://127.0.0.1:1/x.zip"}, train=train, finetune={"epochs": 2}
            )
        )
    )
    results = {}
    for distribute in ("none", "mirrored"):
        paths = make_workspace(tmp_path / distribute, {"train": 24, "validation": 12})
        _run_both_phases(paths.root, params, distribute)
        results[distribute] = json.loads(paths.candidate.read_text())

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("cats_vs_dogs")
    runs = client.search_runs([experiment.experiment_id], "tags.phase != ''")
    recorded = {(r.data.tags["phase"], r.data.params["distribute"]): r.data.params for r in runs}
    for phase, rate in (("train", 0.003), ("finetune", 1e-5)):
        mirrored, single = recorded[(phase, "mirrored")], recorded[(phase, "none")]
        assert (mirrored["replicas"], mirrored["devices"]) == ("2", "CPU:0, CPU:1")
        assert (single["replicas"], single["devices"]) == ("1", "CPU:0")
        assert mirrored["global_batch_size"] == "16" and single["global_batch_size"] == "8"
        assert float(mirrored["scaled_learning_rate"]) == pytest.approx(2 * rate)
        assert float(single["scaled_learning_rate"]) == pytest.approx(rate)

    for phase in ("train", "finetune"):
        one, two = results["none"][phase], results["mirrored"][phase]
        assert one["val_accuracy"] >= 0.8 and two["val_accuracy"] >= 0.8, results
        assert abs(one["val_accuracy"] - two["val_accuracy"]) <= 0.15, results
