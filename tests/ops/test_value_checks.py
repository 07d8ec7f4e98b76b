"""Value checks of the Mesa ops: concrete inputs out of range (λ ≤ 0, g > 0, β < 0) or non-finite give a one-line
ValueError naming the argument; traced inputs are checked under `inputs.checked` (checkify) and pass through
unchecked otherwise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesanet_jax.ops import inputs
from mesanet_jax.ops.chunked import mesa_chunked
from mesanet_jax.ops.decode import mesa_decode_step
from mesanet_jax.ops.inputs import zero_state


def _args(batch=1, length=8, heads=2, dim=4):
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (normal(batch, length, heads, dim),
                                                                   normal(batch, length, heads, dim)))
  return dict(q=q, k=k, v=normal(batch, length, heads, dim), g=-jnp.abs(normal(batch, length, heads)),
              beta=jax.nn.sigmoid(normal(batch, length, heads)), lam=jnp.ones((heads, dim)))


BAD = [("lam", lambda x: x.at[0, 0].set(0.0), "lam must be > 0"),
       ("g", lambda x: x.at[0, 0, 0].set(0.5), "g must be <= 0"),
       ("beta", lambda x: x.at[0, 0, 0].set(-0.1), "beta must be >= 0"),
       ("v", lambda x: x.at[0, 0, 0, 0].set(jnp.nan), "v has 1 NaN or Inf"),
       ("q", lambda x: x.at[0, 0, 0, 0].set(jnp.inf), "q has 1 NaN or Inf")]


@pytest.mark.parametrize("name, corrupt, message", BAD, ids=[b[0] for b in BAD])
def test_chunked_rejects_concrete_values(name, corrupt, message):
  args = _args()
  args[name] = corrupt(args[name])
  with pytest.raises(ValueError, match=message):
    mesa_chunked(**args, chunk_size=4, cg_steps=2)


@pytest.mark.parametrize("name, corrupt, message", BAD, ids=[b[0] for b in BAD])
def test_decode_step_rejects_concrete_values(name, corrupt, message):
  args = {key: (value[:, 0] if value.ndim > 2 else value) for key, value in _args().items()}  # one token
  args[name] = corrupt(args[name][:, None] if args[name].ndim > 2 or name in ("g", "beta") else args[name])
  args[name] = args[name][:, 0] if name != "lam" else args[name]
  state = zero_state(1, 2, 4, 4)
  with pytest.raises(ValueError, match=message):
    mesa_decode_step(**args, state=state, cg_steps=2)


@pytest.mark.slow
def test_traced_values_are_checked_in_debug_mode_only():
  args = _args()
  # A new jitted function for each mode: a jitted function keeps the checks it was first traced with.
  forward = lambda name: jax.jit(lambda x: mesa_chunked(**{**args, name: x}, chunk_size=4, cg_steps=2)[0])
  good, bad = args["lam"], args["lam"].at[1, 2].set(-1.0)
  np.testing.assert_array_equal(inputs.checked(forward("lam"))(good), forward("lam")(good))  # no value changes
  forward("lam")(bad)  # traced, no debug mode: runs unchecked (no error)
  with pytest.raises(Exception, match="lam must be > 0"):
    inputs.checked(forward("lam"))(bad)
  with pytest.raises(Exception, match="g has NaN or Inf"):
    inputs.checked(forward("g"))(args["g"].at[0, 1, 1].set(jnp.nan))
