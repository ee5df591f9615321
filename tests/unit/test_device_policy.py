"""The device policy (tasks.ml.devices): what ``auto`` resolves to on each kind of device."""

from __future__ import annotations

import pytest

from tasks.config import parse_config
from tasks.errors import StageError
from tasks.ml.devices import Gpu, resolve_policy
from tests.datagen import tiny_params

H200 = Gpu("GPU:0", "NVIDIA H200", (9, 0))
A100 = Gpu("GPU:0", "NVIDIA A100", (8, 0))
T4 = Gpu("GPU:0", "Tesla T4", (7, 5))
P100 = Gpu("GPU:0", "Tesla P100", (6, 0))


@pytest.mark.parametrize(
    ("gpus", "precision", "jit", "distribute", "replicas"),
    [
        ([], "float32", False, "none", 1),
        ([H200], "mixed_bfloat16", True, "none", 1),
        ([A100], "mixed_bfloat16", True, "none", 1),
        ([T4], "mixed_float16", True, "none", 1),
        ([P100], "float32", True, "none", 1),
        ([H200, Gpu("GPU:1", "NVIDIA H200", (9, 0))], "mixed_bfloat16", True, "mirrored", 2),
        ([A100, Gpu("GPU:1", "Tesla T4", (7, 5))], "mixed_float16", True, "mirrored", 2),
    ],
)
def test_auto_follows_the_devices(gpus, precision, jit, distribute, replicas):
    policy = resolve_policy("auto", "auto", "auto", gpus)
    assert (policy.precision, policy.jit_compile, policy.distribute, policy.replicas) == (
        precision,
        jit,
        distribute,
        replicas,
    )


def test_explicit_values_win_over_auto():
    policy = resolve_policy("float32", "false", "none", [H200, H200])
    assert (policy.precision, policy.jit_compile, policy.replicas) == ("float32", False, 1)
    assert resolve_policy("mixed_bfloat16", "true", "none", []).precision == "mixed_bfloat16"
    assert resolve_policy("auto", "true", "none", []).jit_compile is True


def test_mirrored_on_cpu_spans_the_logical_cpus():
    policy = resolve_policy("auto", "auto", "mirrored", [], cpus=2)
    assert policy.devices == ("CPU:0", "CPU:1")
    assert policy.replicas == 2
    assert resolve_policy("auto", "auto", "auto", [], cpus=2).replicas == 1


def test_batch_is_per_replica_and_the_rate_scales_linearly():
    policy = resolve_policy("auto", "auto", "auto", [A100] * 4)
    assert policy.global_batch(32) == 128
    assert policy.learning_rate(1e-5) == pytest.approx(4e-5)
    single = resolve_policy("auto", "auto", "auto", [])
    assert (single.global_batch(32), single.learning_rate(1e-5)) == (32, 1e-5)


def test_a_precision_the_gpu_cannot_do_is_refused_with_the_fix():
    with pytest.raises(StageError) as error:
        resolve_policy("mixed_bfloat16", "auto", "auto", [T4])
    assert str(error.value) == (
        "train.precision=mixed_bfloat16 needs compute capability 8.0 or more but GPU:0 "
        "(Tesla T4, compute capability 7.5) has less; set train.precision to auto or float32"
    )
    with pytest.raises(StageError, match="mixed_float16 needs compute capability 7.0"):
        resolve_policy("mixed_float16", "auto", "auto", [P100])


def test_mlflow_sees_the_same_param_names_on_every_device():
    cpu = resolve_policy("auto", "auto", "auto", [])
    gpus = resolve_policy("auto", "auto", "auto", [H200, H200])
    assert cpu.params().keys() == gpus.params().keys()
    assert gpus.params() == {
        "precision": "mixed_bfloat16",
        "jit_compile": True,
        "distribute": "mirrored",
        "replicas": 2,
        "devices": "GPU:0, GPU:0",
        "workers": 1,
    }
    across = resolve_policy("auto", "auto", "multi_worker", [H200, H200], workers=3)
    assert across.params().keys() == cpu.params().keys()


def test_multi_worker_replicas_are_every_workers_devices_and_scale_batch_and_rate():
    gpus = resolve_policy("auto", "auto", "multi_worker", [A100] * 4, workers=2)
    assert (gpus.replicas, gpus.devices, gpus.workers) == (8, ("GPU:0",) * 4, 2)
    assert (gpus.global_batch(32), gpus.learning_rate(1e-5)) == (256, pytest.approx(8e-5))
    cpu = resolve_policy("auto", "auto", "multi_worker", [], cpus=2, workers=3)
    assert (cpu.replicas, cpu.devices, cpu.workers) == (3, ("CPU:0",), 3)  # one CPU replica each
    assert str(cpu) == "float32, XLA off, multi_worker x3 on CPU:0 on each of 3 workers"
    # the worker count means nothing to one machine's strategies
    assert resolve_policy("auto", "auto", "mirrored", [A100] * 2, workers=3).replicas == 2


def test_params_accept_yaml_booleans_and_refuse_unknown_values():
    params = tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/x.zip"})
    params["train"] |= {"jit_compile": True, "precision": "mixed_float16"}
    cfg = parse_config(params)
    assert (cfg.train.jit_compile, cfg.train.precision, cfg.train.distribute) == (
        "true",
        "mixed_float16",
        "auto",
    )
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="train.precision"):
        parse_config(params, ["train.precision=float16"])
