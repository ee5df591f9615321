"""The device policy: which precision, XLA and distribution a phase trains with.

``train.precision``, ``train.jit_compile`` and ``train.distribute`` may each be
``auto``; :func:`resolve_policy` turns them into one concrete
:class:`DevicePolicy` for the devices this process can see, by these rules:

- precision ``auto``: ``mixed_bfloat16`` when every visible GPU has compute
  capability 8.0 or more (Ampere and later: bfloat16 tensor cores, no loss
  scaling), ``mixed_float16`` from 7.0 (Volta, Turing: float16 tensor cores;
  Keras wraps the optimizer in a loss-scale optimizer), ``float32`` on older
  GPUs and on CPU (measured on a 2-core CPU, bfloat16 gave no gain).
- jit_compile ``auto``: XLA on GPUs, not on CPU (there it made a MobileNetV2
  fine-tune step about 8x slower).
- distribute ``auto``: ``mirrored`` with more than one GPU, else ``none``.
  Under ``mirrored``, ``train.batch_size`` is per replica: the global batch is
  ``batch_size x replicas`` and the learning rate is multiplied by the replica
  count (the linear scaling rule of Goyal et al., 2017, "Accurate, Large
  Minibatch SGD"), so each replica sees the batch and step size of one device.

The output layer always computes in float32 (``tasks.ml.model``), and saved
models are float32 whatever the policy, so evaluation and serving on a CPU
read the same file. GPU memory growth is switched on, so a process takes the
memory it uses rather than the whole card.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.errors import StageError

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
FLOAT16_CAPABILITY = (7, 0)
BFLOAT16_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Gpu:
    """One visible GPU: its TensorFlow name, model name and compute capability."""

    name: str
    model: str = "unknown"
    capability: tuple[int, int] | None = None

    def __str__(self) -> str:
        cc = f", compute capability {self.capability[0]}.{self.capability[1]}"
        return f"{self.name} ({self.model}{cc if self.capability else ''})"


@dataclass(frozen=True)
class DevicePolicy:
    """How a phase trains: resolved from the params and the visible devices."""

    precision: str
    jit_compile: bool
    distribute: str
    replicas: int
    devices: tuple[str, ...]

    def global_batch(self, batch_size: int) -> int:
        """Images per optimizer step: ``batch_size`` per replica."""
        return batch_size * self.replicas

    def learning_rate(self, learning_rate: float) -> float:
        """The linear scaling rule: the rate grows with the replica count."""
        return learning_rate * self.replicas

    def params(self) -> dict[str, Any]:
        """What MLflow records (the same names on every device)."""
        return {
            "precision": self.precision,
            "jit_compile": self.jit_compile,
            "distribute": self.distribute,
            "replicas": self.replicas,
            "devices": ", ".join(self.devices),
        }

    def __str__(self) -> str:
        return (
            f"{self.precision}, XLA {'on' if self.jit_compile else 'off'}, "
            f"{self.distribute} x{self.replicas} on {', '.join(self.devices)}"
        )


def resolve_policy(
    precision: str, jit_compile: str, distribute: str, gpus: list[Gpu], cpus: int = 1
) -> DevicePolicy:
    """The concrete policy for ``gpus`` (empty: CPU, with ``cpus`` logical devices).

    Explicit values are honoured, except those the devices cannot do, which
    raise a one-line :class:`StageError` naming the fix.
    """
    if precision == "auto":
        precision = _auto_precision(gpus)
    elif precision not in PRECISIONS:
        raise StageError(f"train.precision={precision!r}; use auto or one of {PRECISIONS}")
    elif precision == "mixed_bfloat16" and gpus:
        _require(gpus, BFLOAT16_CAPABILITY, precision)
    elif precision == "mixed_float16" and gpus:
        _require(gpus, FLOAT16_CAPABILITY, precision)
    elif precision == "mixed_float16":
        log.warning("train.precision=mixed_float16 on CPU: CPUs have no fast float16 math")
    jit = bool(gpus) if jit_compile == "auto" else jit_compile == "true"
    devices = tuple(gpu.name for gpu in gpus) or tuple(f"CPU:{i}" for i in range(max(cpus, 1)))
    if distribute == "auto":
        distribute = "mirrored" if len(gpus) > 1 else "none"
    if distribute not in ("none", "mirrored"):
        raise StageError(f"train.distribute={distribute!r}; use auto, none or mirrored")
    if distribute == "none":
        devices = devices[:1]
    return DevicePolicy(precision, jit, distribute, len(devices), devices)


def _auto_precision(gpus: list[Gpu]) -> str:
    if not gpus or any(gpu.capability is None for gpu in gpus):
        return "float32"
    lowest = min(gpu.capability for gpu in gpus if gpu.capability)
    if lowest >= BFLOAT16_CAPABILITY:
        return "mixed_bfloat16"
    if lowest >= FLOAT16_CAPABILITY:
        return "mixed_float16"
    return "float32"


def _require(gpus: list[Gpu], capability: tuple[int, int], precision: str) -> None:
    for gpu in gpus:
        if gpu.capability is not None and gpu.capability < capability:
            need = f"{capability[0]}.{capability[1]}"
            raise StageError(
                f"train.precision={precision} needs compute capability {need} or more but "
                f"{gpu} has less; set train.precision to auto or float32"
            )


def visible_gpus() -> list[Gpu]:
    """The GPUs TensorFlow sees, memory growth switched on for each (before first use)."""
    import tensorflow as tf

    gpus = []
    for index, device in enumerate(tf.config.list_physical_devices("GPU")):
        try:
            tf.config.experimental.set_memory_growth(device, True)
        except RuntimeError:  # already initialised in this process: growth is as it was
            pass
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        gpus.append(
            Gpu(
                name=f"GPU:{index}",
                model=str(details.get("device_name", "unknown")),
                capability=tuple(capability) if capability else None,
            )
        )
    return gpus


def device_policy(precision: str, jit_compile: str, distribute: str) -> DevicePolicy:
    """Resolve the policy for this process's devices and apply its precision globally."""
    import keras
    import tensorflow as tf

    gpus = visible_gpus()
    cpus = len(tf.config.list_logical_devices("CPU"))
    policy = resolve_policy(precision, jit_compile, distribute, gpus, cpus)
    keras.mixed_precision.set_global_policy(policy.precision)
    log.info("device policy: %s", policy)
    return policy


def strategy(policy: DevicePolicy) -> tf.distribute.Strategy:
    """``MirroredStrategy`` over the policy's devices, or the default (one device) strategy."""
    import tensorflow as tf

    if policy.distribute != "mirrored":
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices=[f"/{name}" for name in policy.devices])
