"""Meshes and logical-axis sharding rules.

Every parameter declares logical axis names (see `model/qwen2.py`); a small mapping from
logical names to mesh axes turns them into `PartitionSpec`s. The same rules shard
activations through `constrain`, which is a no-op outside `use_mesh`.

Mesh axes: `data` (pure data parallelism, parameters replicated), `fsdp` (data parallelism
with parameters and optimizer state sharded), `tensor` (heads and MLP columns split).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 for "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):  # checked when a config loads, before any device is counted
        sizes = [self.data, self.fsdp, self.tensor]
        for name, s in zip(MESH_AXES, sizes):
            if s == 0 or s < -1:
                raise ValueError(f"mesh.{name}: expected a positive size or -1, got {s}")
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh: fixed axes {dict(zip(MESH_AXES, sizes))} (product {known}) do not divide "
                    f"the {num_devices} devices"
                )
            sizes = [num_devices // known if s == -1 else s for s in sizes]
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh: axis sizes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)}, "
                f"but there are {num_devices} devices"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor) over `devices` (default: all devices)."""
    if config is None:
        config = MeshConfig()
    elif isinstance(config, Mapping):
        config = MeshConfig(**config)
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU or unusual topologies: plain row-major order
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _mesh_axes_for(logical: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
    if logical is None:
        return ()
    if logical not in rules:
        raise KeyError(f"no sharding rule for logical axis {logical!r}")
    target = rules[logical]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, rules: Mapping[str, Any] | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for an array with logical `axes` on `mesh`.

    Mesh axes of size 1 are dropped. With `shape`, a dimension that a mesh axis does not
    divide is left unsplit over that axis (e.g. 2 KV heads over tensor=4 are replicated).
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec: list[Any] = []
    for i, logical in enumerate(axes):
        chosen = []
        size = 1
        for mesh_axis in _mesh_axes_for(logical, rules):
            if mesh_axis not in mesh.axis_names and mesh_axis not in MESH_AXES:
                raise ValueError(f"sharding rule {logical!r} -> {mesh_axis!r}: not a mesh axis "
                                 f"(the mesh has {tuple(mesh.axis_names)})")
            n = mesh.shape.get(mesh_axis, 1)
            if n == 1 or mesh_axis in used:
                continue
            if shape is not None and shape[i] % (size * n):
                continue
            chosen.append(mesh_axis)
            size *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def spec_axes(spec: PartitionSpec) -> list[str]:
    """The mesh axes a PartitionSpec splits over, in order."""
    return [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]


def unsplit_dimensions(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                       rules: Mapping[str, Any] | None = None) -> list[tuple[int, str, str]]:
    """(dimension, logical axis, mesh axis) for each mesh axis (size > 1) that the rules ask
    to split an array over but that `logical_to_spec` leaves out because it does not divide
    the dimension: the array is then held whole over that mesh axis."""
    rules = DEFAULT_RULES if rules is None else rules
    used = set(spec_axes(logical_to_spec(axes, mesh, rules, shape)))
    out = []
    for i, logical in enumerate(axes):
        for mesh_axis in _mesh_axes_for(logical, rules):
            if mesh.shape.get(mesh_axis, 1) > 1 and mesh_axis not in used:
                out.append((i, logical, mesh_axis))
                used.add(mesh_axis)
    return out


def check_split(arrays: Mapping[str, tuple[Sequence[int], Sequence[str | None]]], mesh: Mesh,
                rules: Mapping[str, Any] | None = None, *, bytes_per_element: int = 16,
                what: str = "train state", min_excess_bytes: int = 256 << 20,
                max_excess_ratio: float = 0.1) -> None:
    """Fail early when sharding leaves large arrays whole on every device.

    `arrays` maps a name to (shape, logical axes). A mesh axis that does not divide the
    dimension the rules split over it is dropped from that array's spec (`logical_to_spec`):
    right for small tensors (2 KV heads over tensor=4), a silent out-of-memory for large ones
    (a 3584-wide embedding over fsdp=12 leaves a 7B model whole on every device). Raises
    ValueError naming the arrays, dimensions and axis sizes when the bytes held on each device
    beyond an even split exceed both `min_excess_bytes` and `max_excess_ratio` of that split.
    Mapping a logical axis to None in the rules replicates it on purpose (not reported).
    """
    ideal = excess = 0.0
    offenders = []
    for name, (shape, axes) in arrays.items():
        nbytes = math.prod(shape) * bytes_per_element
        held = math.prod(mesh.shape[a] for a in spec_axes(logical_to_spec(axes, mesh, rules, shape)))
        missing = unsplit_dimensions(axes, shape, mesh, rules)
        want = held * math.prod(mesh.shape[a] for _, _, a in missing)
        ideal += nbytes / want
        if missing:
            extra = nbytes / held - nbytes / want
            excess += extra
            offenders.append((extra, name, tuple(shape), missing))
    if excess <= min_excess_bytes or excess <= max_excess_ratio * ideal:
        return
    gib = 1 << 30
    sizes = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
    lines = [f"{what}: {(ideal + excess) / gib:.2f} GiB per device instead of {ideal / gib:.2f} GiB on the mesh "
             f"({sizes}): these arrays are held whole over a mesh axis that does not divide them"]
    for extra, name, shape, missing in sorted(offenders, reverse=True)[:8]:
        why = "; ".join(f"dim {i} ({logical!r}, {shape[i]}) is not divisible by {a}={mesh.shape[a]}"
                        for i, logical, a in missing)
        lines.append(f"  {name} {list(shape)}: +{extra / gib:.2f} GiB per device: {why}")
    if len(offenders) > 8:
        lines.append(f"  ... and {len(offenders) - 8} more")
    lines.append("Choose mesh axis sizes that divide these dimensions, or map the logical axis to None "
                 "in the sharding rules to replicate it on purpose.")
    raise ValueError("\n".join(lines))


def named_sharding(axes: Sequence[str | None], mesh: Mesh, rules: Mapping[str, Any] | None = None,
                   shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, shape))


def state_shardings(state: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Any:
    """NamedShardings for an `nnx.State` (concrete or abstract), from each Variable's `axes`."""
    from flax import nnx

    def one(v):
        if isinstance(v, nnx.Variable):
            axes = v.get_metadata().get("axes")
            shape = v.shape
            if axes is None:
                axes = (None,) * len(shape)
            return v.replace(named_sharding(axes, mesh, rules, shape))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping[str, Any] | None = None) -> NamedSharding:
    """Sharding for a batch-major array: first dimension over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh, rules))


def data_parallel_size(mesh: Mesh, rules: Mapping[str, Any] | None = None) -> int:
    rules = DEFAULT_RULES if rules is None else rules
    return math.prod(mesh.shape.get(a, 1) for a in _mesh_axes_for("batch", rules))


# ---------------------------------------------------------------- activations
_CONTEXT: contextvars.ContextVar[tuple[Mesh, Mapping[str, Any]] | None] = contextvars.ContextVar(
    "qzhou_jax_mesh", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Iterator[Mesh]:
    """Within this block, `constrain` pins activations to `mesh` under `rules`."""
    token = _CONTEXT.set((mesh, DEFAULT_RULES if rules is None else rules))
    try:
        yield mesh
    finally:
        _CONTEXT.reset(token)


def current_mesh() -> Mesh | None:
    ctx = _CONTEXT.get()
    return None if ctx is None else ctx[0]


def current_rules() -> Mapping[str, Any]:
    """The logical-axis rules in use (`use_mesh`); DEFAULT_RULES without a mesh."""
    ctx = _CONTEXT.get()
    return DEFAULT_RULES if ctx is None else ctx[1]


def platform(mesh: Mesh | None = None) -> str:
    """The platform ("tpu", "gpu", "cpu") that `mesh`'s devices are, or the default devices without
    one (for a program compiled ahead of time, the target's, not this host's)."""
    return next(iter(mesh.devices.flat if mesh is not None else jax.devices())).platform



def check_kernel_platform(attention_impl: str, where: str) -> None:
    """cuDNN attention exists only on GPUs: elsewhere it fails deep inside the first compile, so
    refuse it up front (splash runs anywhere, interpreted off TPU, with a warning)."""
    if attention_impl == "cudnn" and platform() != "gpu":
        raise ValueError(f"{where}: 'cudnn' is a GPU kernel and this machine's JAX platform is {platform()}; "
                         "use 'xla' (the same attention, any platform)")

def current_data_parallel_size() -> int:
    """The data-parallel size of the mesh in use (`use_mesh`); 1 without one."""
    ctx = _CONTEXT.get()
    return 1 if ctx is None else data_parallel_size(*ctx)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axes; identity when no mesh is in use."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, mesh, rules, x.shape))


def lookup(table: jax.Array, ids: jax.Array, table_axes: Sequence[str | None] = ("vocab", "embed")) -> jax.Array:
    """`table[ids]` (an embedding lookup, ids [batch, seq]) that keeps the table's hidden
    dimension sharded as the table is: the rows are gathered over the batch axes that do not
    shard the table, so the output needs no communication beyond the vocabulary split, and
    its transpose (the scatter-add of the table's gradient) adds up rows without gathering
    them. Without this, a mesh whose batch spans both `data` and `fsdp` made XLA replicate the
    whole [tokens, hidden] gradient on every device to scatter it ("Involuntary full
    rematerialization"). Callers constrain the output to the activations' layout."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return jnp.take(table, ids, axis=0)
    mesh, rules = ctx
    split = logical_to_spec(table_axes, mesh, rules, table.shape)  # as the table is held (an axis that
    taken = set(spec_axes(PartitionSpec(*tuple(split)[1:])))       # does not divide it is not used)
    rows = tuple(a for a in _mesh_axes_for("batch", rules) if a not in taken)
    local = {**rules, "batch": rows or None}
    ids = jax.lax.with_sharding_constraint(ids, named_sharding(("batch", "seq"), mesh, local, ids.shape))
    out = jnp.take(table, ids, axis=0)
    return jax.lax.with_sharding_constraint(
        out, named_sharding(("batch", "seq") + tuple(table_axes[1:]), mesh, local, out.shape))


def describe(state: Any) -> list[tuple[str, tuple[int, ...], str]]:
    """(path, shape, sharding spec) rows for logging what is sharded how."""
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        spec = getattr(getattr(leaf, "sharding", None), "spec", None)
        rows.append((jax.tree_util.keystr(path), tuple(getattr(leaf, "shape", ())), str(spec)))
    return rows


# What JAX's SLURM detection reads (jax._src.clusters.slurm_cluster); srun sets them for its tasks.
_JAX_SLURM_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
    """`jax.distributed.initialize()` when several processes are configured.

    Arguments win; otherwise `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID` (set by the launchers in launch/), else JAX's own detection of TPU
    pods, SLURM steps of several tasks and Open MPI. On a single process nothing happens (a
    one-task SLURM step keeps all its GPUs; so does a batch script of a several-task job run
    without srun, with a warning). CPU-only multi-process
    runs (tests, launch/local.sh) use gloo for the cross-process collectives.
    """
    import os

    if jax.distributed.is_initialized():
        return
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if num_processes is not None and num_processes <= 1:
        return
    if coordinator is None and num_processes is None:
        multi_host_tpu = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1
        # A one-task SLURM step (`srun --gres=gpu:8 --pty bash`, a batch script run without srun) is
        # one process: JAX's SLURM detection would give it only the GPU of SLURM_LOCALID.
        slurm_tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        slurm = "SLURM_JOB_ID" in env and slurm_tasks > 1
        if slurm and not all(k in env for k in _JAX_SLURM_VARIABLES):
            # A batch script run without srun: one copy runs, and JAX's SLURM detection (which
            # needs the step's node list) would fail with no coordinator address.
            log.warning("SLURM job of %d tasks, but this process was not started by srun (%s unset): "
                        "running as one process with this node's devices; start one process per task "
                        "with srun (launch/slurm_gpu.sbatch)", slurm_tasks,
                        ", ".join(k for k in _JAX_SLURM_VARIABLES if k not in env))
            slurm = False
        if not (multi_host_tpu or slurm or "OMPI_COMM_WORLD_SIZE" in env):
            return
    if env.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    log.info("jax.distributed initialized: process %d of %d", jax.process_index(), jax.process_count())
