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
- distribute ``multi_worker`` (never chosen by ``auto``): TensorFlow's
  ``MultiWorkerMirroredStrategy`` across ``train.workers`` machines, each with
  its visible GPUs (or its CPU); the replicas are all of them, and the batch
  and learning rate scale with them as under ``mirrored``.

The output layer always computes in float32 (``tasks.ml.model``), and saved
models are float32 whatever the policy, so evaluation and serving on a CPU
read the same file. GPU memory growth is switched on, so a process takes the
memory it uses rather than the whole card.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.cluster import Cluster
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
    """This machine's devices (under ``multi_worker``, each worker has its own)."""
    workers: int = 1

    def global_batch(self, batch_size: int) -> int:
        """Images per optimizer step: ``batch_size`` per replica."""
        return batch_size * self.replicas

    def learning_rate(self, learning_rate: float) -> float:
        """The linear scaling rule: the rate grows with the replica count."""
        return learning_rate * self.replicas

    @property
    def gpu(self) -> bool:
        return self.devices[0].startswith("GPU")

    def params(self) -> dict[str, Any]:
        """What MLflow records (the same names on every device)."""
        return {
            "precision": self.precision,
            "jit_compile": self.jit_compile,
            "distribute": self.distribute,
            "replicas": self.replicas,
            "devices": ", ".join(self.devices),
            "workers": self.workers,
        }

    def __str__(self) -> str:
        across = f" on each of {self.workers} workers" if self.workers > 1 else ""
        return (
            f"{self.precision}, XLA {'on' if self.jit_compile else 'off'}, "
            f"{self.distribute} x{self.replicas} on {', '.join(self.devices)}{across}"
        )


DISTRIBUTE = ("none", "mirrored", "multi_worker")


def resolve_policy(
    precision: str,
    jit_compile: str,
    distribute: str,
    gpus: list[Gpu],
    cpus: int = 1,
    workers: int = 1,
) -> DevicePolicy:
    """The concrete policy for ``gpus`` (empty: CPU, with ``cpus`` logical devices) on
    each of ``workers`` machines.

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
    if distribute not in DISTRIBUTE:
        raise StageError(f"train.distribute={distribute!r}; use auto or one of {DISTRIBUTE}")
    if distribute == "none" or (distribute == "multi_worker" and not gpus):
        devices = devices[:1]  # a worker without GPUs is one CPU replica
    workers = workers if distribute == "multi_worker" else 1
    return DevicePolicy(precision, jit, distribute, len(devices) * workers, devices, workers)


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


def device_policy(
    precision: str, jit_compile: str, distribute: str, workers: int = 1
) -> DevicePolicy:
    """Resolve the policy for this process's devices and apply its precision globally.

    Under ``multi_worker`` the runtime is left uninitialised (no logical devices are
    listed): TensorFlow configures collective ops only before its first use.
    """
    import keras
    import tensorflow as tf

    gpus = visible_gpus()
    cpus = 1 if distribute == "multi_worker" else len(tf.config.list_logical_devices("CPU"))
    policy = resolve_policy(precision, jit_compile, distribute, gpus, cpus, workers)
    keras.mixed_precision.set_global_policy(policy.precision)
    log.info("device policy: %s", policy)
    return policy


def strategy(policy: DevicePolicy, cluster: Cluster | None = None) -> tf.distribute.Strategy:
    """``MirroredStrategy`` over the policy's devices, ``MultiWorkerMirroredStrategy`` over
    ``cluster``'s workers, or the default (one device) strategy."""
    import tensorflow as tf

    if policy.distribute == "multi_worker":
        return multi_worker_strategy(cluster or Cluster(), gpus=len(policy.devices) * policy.gpu)
    if policy.distribute != "mirrored":
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices=[f"/{name}" for name in policy.devices])


def multi_worker_strategy(cluster: Cluster, gpus: int = 0) -> tf.distribute.Strategy:
    """TensorFlow's collective all-reduce across ``cluster`` (this worker: ``gpus`` GPUs, or
    its CPU), wearing two fixes Keras 3's ``fit`` needs under it (keras-team/keras#20585).

    Keras 3 asks the strategy to ``reduce`` two things that
    ``MultiWorkerMirroredStrategy`` refuses: the first input batch, a nest of per-replica
    tensors, which Keras reduces only to learn its shapes (``MirroredStrategy`` hands
    such a nest back as it is; here each replica's local value comes back, with no
    collective op); and each step's logs, scalars that Keras reduces along axis 0
    (here reduced across the replicas as they are).
    """
    import tensorflow as tf

    class KerasMultiWorker(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op: Any, value: Any, axis: int | None = None) -> Any:
            if isinstance(value, tuple | list | dict):
                return tf.nest.map_structure(lambda v: self.experimental_local_results(v)[0], value)
            if axis is not None and self.experimental_local_results(value)[0].shape.rank == 0:
                axis = None
            return super().reduce(reduce_op, value, axis)

    if not cluster.hosts:  # one worker: this machine alone
        return KerasMultiWorker()
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": list(cluster.hosts)}),
        task_type="worker",
        task_id=cluster.index,
        num_accelerators={"GPU": gpus} if gpus else None,
        rpc_layer="grpc",
    )
    return KerasMultiWorker(cluster_resolver=resolver)
