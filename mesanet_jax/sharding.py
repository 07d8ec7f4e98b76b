"""Device mesh and the ONE table mapping logical axis names to mesh axes.

Parameters name their axes logically when created (`layers/params.py`): "vocab", "embed", "heads" (the H·D
projection width, or H), "kv" (head dim), "mlp", "lru" (the Hawk recurrence's width), "conv", and "layers" (the
stacked block axis of `scan_layers`, never split). Models never mention mesh axes; this file does. Mesh axes:
"data" (pure data parallel), "fsdp" (data parallel with parameters sharded over "embed"), "tensor" (heads / mlp /
vocab). A mesh axis that does not divide a dimension is dropped for that parameter (e.g. vocab 50,257 stays whole).
Activations between blocks are pinned to ("batch", None, None) by `constrain`.

Kernels: the XLA Mesa op is partitioned by the compiler; a Pallas `pallas_call` is not, so `MesaLayer.mix` runs
impl="pallas" through `per_shard`, a `jax.shard_map` over the mesh set with `jax.set_mesh` whose specs come from this
same table (batch and heads split, nothing else).
"""
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("lru", "tensor"),
    ("kv", None),
    ("conv", None),
    ("layers", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh; one size may be −1 to take the remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh size may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not multiply to {len(devices)} devices")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  """PartitionSpec for an array of `shape` whose axes are named `names`, by `RULES`, dropping non-dividing axes."""
  rules = dict(RULES)
  spec = []
  for name, size in zip(names, shape):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no rule in sharding.RULES")
    mesh_axes = rules.get(name) if name is not None else None
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
    kept = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
    if kept and size % int(np.prod([mesh.shape[a] for a in kept])) == 0:
      spec.append(kept[0] if len(kept) == 1 else kept)
    else:
      spec.append(None)
  return P(*spec)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh):
  """NamedSharding for every variable of an (abstract or concrete) nnx.State, from its logical `out_sharding`."""
  def sharding(variable):
    names = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
    return NamedSharding(mesh, logical_spec(tuple(names), variable.shape, mesh))
  return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_model, mesh: jax.sharding.Mesh):
  """Builds `make_model()` with every parameter born sharded: abstract shapes first, then one jitted init."""
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
  shardings = state_shardings(abstract_state, mesh)
  state = jax.jit(lambda: nnx.state(make_model()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Inputs [B, ...]: batch over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, logical_spec(("batch",) + (None,) * (ndim - 1), (0,) * ndim, mesh))


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Pins an activation's sharding by its logical axis `names` (by `RULES`) on the mesh set by `jax.set_mesh`.

  Without it the partitioner may carry a parameter's sharding into activations (e.g. [B, T, D] split over "embed"
  after the embedding lookup) and reshard them back at every use. Without a mesh, x is returned unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))


def per_shard(fn, in_names, out_names):
  """`fn` run on each shard of the mesh set by `jax.set_mesh`, for ops XLA cannot partition (Pallas kernels).

  in_names / out_names: pytrees matching fn's arguments / results whose leaves are tuples of logical axis names (one
  per array axis); each array is split by `RULES` (non-dividing mesh axes dropped). Without a mesh, fn is returned.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn
  is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
  specs = lambda names, arrays: jax.tree.map(lambda n, a: logical_spec(n, a.shape, mesh), names, arrays,
                                             is_leaf=is_names)

  def wrapped(*args):
    out_shapes = jax.eval_shape(fn, *args)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs(tuple(in_names), args),
                         out_specs=specs(out_names, out_shapes), check_vma=False)(*args)
  return wrapped
