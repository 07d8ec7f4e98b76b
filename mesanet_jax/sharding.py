"""Device mesh and the ONE table mapping logical axis names to mesh axes.

Parameters name their axes logically when created (`layers/params.py`): "vocab", "embed", "heads" (the H·D
projection width, or H), "kv" (head dim), "mlp", "lru" (the Hawk recurrence's width), "conv", and "layers" (the
stacked block axis of `scan_layers`, never split). Models never mention mesh axes; this file does. Mesh axes: "data"
(pure data parallel), "fsdp" (data parallel with parameters sharded over "embed"), "tensor" (heads / mlp / vocab).

flax does the lookup (`nnx.logical_axis_rules(RULES)` + `nnx.get_partition_spec`); ours is one extra rule, `_fit`: a
mesh axis of size 1, or one that does not divide the dimension, is dropped for that array (vocab 50,257 stays whole).
Everything that places arrays goes through here: `shardings` (params, optimiser state), `batch_shardings` (inputs),
`replicated`, `constrain` (activations between blocks, pinned to ("batch", None, None)) and `per_shard`.

Kernels: the XLA Mesa op is partitioned by the compiler; a Pallas `pallas_call` is not, so `MesaLayer.mix` runs
impl="pallas" through `per_shard`, a `jax.shard_map` over the mesh set with `jax.set_mesh` whose specs come from this
same table (batch and heads split, nothing else).
"""
import flax.core.spmd
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


def _fit(spec: P, shape: tuple[int, ...], mesh) -> P:
  """`spec` (mesh axes by RULES) for an array of `shape`: mesh axes of size 1 and axes whose product does not divide
  the dimension dropped, missing trailing entries None. A logical name left over had no rule: ValueError."""
  fitted = []
  for entry, size in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    for axis in axes:
      if axis not in mesh.shape:
        raise ValueError(f"logical axis {axis!r} has no rule in sharding.RULES")
    kept = tuple(a for a in axes if mesh.shape[a] > 1)
    divides = kept and size % int(np.prod([mesh.shape[a] for a in kept])) == 0
    fitted.append((kept[0] if len(kept) == 1 else kept) if divides else None)
  return P(*fitted)


def logical_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> P:
  """PartitionSpec for an array of `shape` whose axes are named `names`, by `RULES`, dropping non-dividing axes."""
  return _fit(flax.core.spmd.get_pspec(P(*names), RULES), shape, mesh)


def shardings(tree, mesh: jax.sharding.Mesh):
  """`tree` (an nnx.State or pytree of Variables, abstract or concrete) with every Variable's value replaced by its
  NamedSharding, from the Variable's logical `out_sharding` (none: replicated); the structure stays the same."""
  with nnx.logical_axis_rules(RULES):
    specs = nnx.get_partition_spec(tree)
  return jax.tree.map(lambda x, spec: NamedSharding(mesh, _fit(spec, x.shape, mesh)), tree, specs)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """A whole copy on every device (scalars: the step, metrics)."""
  return NamedSharding(mesh, P())


def batch_shardings(tree, mesh: jax.sharding.Mesh):
  """NamedSharding for every array [B, ...] of `tree` (a batch dict, or one array): B over the batch shards
  (data × fsdp) where it divides, the rest replicated."""
  return jax.tree.map(lambda x: NamedSharding(mesh, logical_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)),
                      tree)


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
