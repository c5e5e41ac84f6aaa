"""How a run lays out on its devices: the ('data', 'model') mesh, and whether the train state
is sharded (FSDP); chosen from one device's memory unless the config's `mesh` keys say.

- `model`: devices per teacher replica. A T5 teacher's heads, FFN width and vocabulary are split
  over them (Megatron style, ``core.sharding.DEFAULT_RULES``); batches go over `data`; the index
  over every device. Chosen: the fewest that keep the teacher's share under half a device.
- `fsdp`: the train state's parameters and optimizer state split over every device along one
  dimension each; XLA gathers a parameter where a layer uses it and reduce-scatters its gradient.
  Chosen: on when the replicated state and the teacher's share would pass half a device.
Half a device leaves the other half to the index shard and the step's temporaries, which
``art-jax train --dry-run`` measures from the compiled step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.core.errors import UserError
from art_jax.core.sharding import make_mesh
from art_jax.models.shapes import abstract_t5, hf_config, parameter_bytes
from art_jax.retrieval.search import DEVICES as EVERY_DEVICE

FSDP_CHOICES = ("auto", "on", "off")
# arrays whose piece per device would be smaller stay replicated: splitting a bias or a LayerNorm saves nothing
# worth a collective
MIN_ELEMENTS_PER_DEVICE = 256
# (words in jax's device_kind, GB): the first match wins
KNOWN_MEMORY_GB = ((("GH200",), 96), (("A100", "80GB"), 80), (("A100",), 40), (("H100", "NVL"), 94), (("H100",), 80),
                   (("H200",), 141), (("TPU v4 lite",), 8), (("TPU v4",), 32), (("TPU v5 lite",), 16),
                   (("TPU v5e",), 16), (("TPU v5",), 95), (("TPU v6 lite",), 32))
GB = 1e9


def check_mesh_config(cfg) -> None:
    mesh = cfg.mesh
    if mesh.model < 0:
        raise UserError(f"mesh.model={mesh.model} is negative (0 chooses from the device memory)")
    if mesh.model and jax.local_device_count() % mesh.model:
        raise UserError(f"mesh.model={mesh.model} does not divide the {jax.local_device_count()} devices of a process "
                        "(a teacher replica stays within one process)")
    if mesh.fsdp not in FSDP_CHOICES:
        raise UserError(f"mesh.fsdp: {mesh.fsdp!r} is not one of {', '.join(FSDP_CHOICES)}")
    if mesh.device_memory_gb < 0:
        raise UserError(f"mesh.device_memory_gb={mesh.device_memory_gb} is negative (0: the device's own)")


def known_memory_gb(device_kind: str) -> float | None:
    compact = device_kind.replace(" ", "")
    for words, gb in KNOWN_MEMORY_GB:
        if all(word.replace(" ", "") in compact for word in words):
            return float(gb)
    return None


def device_memory(cfg, device: jax.Device | None = None) -> tuple[float | None, str]:
    """(bytes of one device's memory, where that figure comes from); (None, why) on CPU devices
    without mesh.device_memory_gb."""
    device = device or jax.devices()[0]
    if cfg.mesh.device_memory_gb:
        return cfg.mesh.device_memory_gb * GB, "mesh.device_memory_gb"
    if device.platform == "cpu":
        return None, "CPU devices: set mesh.device_memory_gb to size for an accelerator"
    known = known_memory_gb(device.device_kind)
    # the allocator's limit when it has one: a GPU's default preallocation leaves it a part of the memory
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit and (not known or limit < known * GB):
        return float(limit), f"{device.device_kind} (its allocator's limit)"
    if known:
        return known * GB, device.device_kind
    return None, f"{device.device_kind}: memory unknown; set mesh.device_memory_gb"


def teacher_shapes(cfg):
    """The T5 teacher a config trains with, as shapes (None when it has none)."""
    if cfg.method != "art" or cfg.scorer.kind != "t5":
        return None
    return abstract_t5(hf_config(cfg.scorer.checkpoint), dtype=cfg.scorer.dtype, param_dtype=cfg.scorer.dtype)


def choose_model_axis(devices: int, teacher, memory: float | None) -> int:
    """The fewest devices per teacher replica (dividing a process's ``devices``: a replica stays
    within a process; and the teacher's heads) whose
    share of the teacher stays under half of ``memory``; the most there can be when none does."""
    if teacher is None or memory is None:
        return 1
    sizes = [m for m in range(1, devices + 1) if devices % m == 0 and teacher.config.num_heads % m == 0]
    total = parameter_bytes(teacher)
    return next((m for m in sizes if total / m <= memory / 2), sizes[-1])


@dataclasses.dataclass(frozen=True)
class Layout:
    mesh: Mesh
    fsdp: str  # "on", "off" or "auto" (decided by ``shards_state`` from the state's size)
    memory: float | None  # bytes of one device
    memory_source: str
    teacher_bytes: int  # the teacher's parameters, all of them

    @property
    def model(self) -> int:
        return self.mesh.shape["model"]

    def shards_state(self, state) -> bool:
        if self.fsdp != "auto":
            return self.fsdp == "on"
        if self.memory is None:
            return False
        replicated = parameter_bytes(state) + self.teacher_bytes / self.model
        return replicated > self.memory / 2

    def describe(self, fsdp: bool) -> str:
        memory = f"{self.memory / GB:.0f} GB" if self.memory else "unknown"
        return (f"mesh data={self.mesh.shape['data']} x model={self.model}, train state "
                f"{'sharded over every device (FSDP)' if fsdp else 'replicated'}; device memory {memory} "
                f"({self.memory_source})")


def plan_layout(cfg, devices=None) -> Layout:
    check_mesh_config(cfg)
    devices = devices if devices is not None else jax.devices()
    memory, source = device_memory(cfg, devices[0])
    # (nothing to choose without a memory figure: the teacher's config is not even read)
    teacher = teacher_shapes(cfg) if memory is not None and (not cfg.mesh.model or cfg.mesh.fsdp == "auto") else None
    model = cfg.mesh.model or choose_model_axis(jax.local_device_count(), teacher, memory)
    mesh = make_mesh(model=model, devices=devices)
    return Layout(mesh, cfg.mesh.fsdp, memory, source, parameter_bytes(teacher) if teacher is not None else 0)


def fsdp_spec(shape, devices: int) -> P:
    """The largest dimension that splits evenly over ``devices``, split over all of them; small
    arrays, and those with no such dimension, replicated."""
    dims = [i for i, size in enumerate(shape) if size % devices == 0]
    if math.prod(shape) < devices * MIN_ELEMENTS_PER_DEVICE or not dims or devices == 1:
        return P()
    axis = max(dims, key=lambda i: shape[i])
    return P(*(EVERY_DEVICE if i == axis else None for i in range(len(shape))))


def state_shardings(state, mesh: Mesh, fsdp: bool):
    """NamedShardings for a train state (arrays or shapes): replicated, or each array as ``fsdp_spec``."""
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.size) if fsdp else P()), state)
