"""Parameters made to vary over the mesh axes their data varies over (``shard_map``).

Inside ``jax.shard_map`` (with ``check_vma``, the default) every value is typed
by the manual mesh axes it varies over. A replicated parameter is invariant;
combining it with per-device data inserts an implicit cast to varying, whose
transpose is a ``psum``. So ``jax.grad`` of a per-device loss with respect to a
replicated parameter returns the gradient *summed over devices*. Inside an
inner loop that means every device adapts with every device's support gradient,
and the meta-gradient no longer matches the unsharded computation.

Casting the parameters to varying before they meet the data makes each device
differentiate its own loss: the casts happen where the library itself
differentiates (``core.inner_loop``, ``core.meta_value_and_grad``, iMAML's
implicit solve). Outside ``shard_map`` no value varies over any axis, so the
cast is the identity and adds nothing to the traced program.
"""

from __future__ import annotations

from typing import Any

import jax

# ``pcast(..., to="varying")`` replaced ``pvary`` (removed in JAX 0.10).
_pcast = getattr(jax.lax, "pcast", None)
_pvary = getattr(jax.lax, "pvary", None)


def varying_axes(x: Any) -> frozenset:
    """The manual mesh axes a value varies over (empty outside ``shard_map``)."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return frozenset()
    aval = typeof(x)
    mat = getattr(aval, "mat", None)  # JAX >= 0.10
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # JAX 0.6 - 0.9


def like_data(params: Any, *data: Any) -> Any:
    """``params`` cast to vary over every mesh axis any ``data`` leaf varies over.

    Args:
      params: a pytree of arrays (the parameters about to be differentiated).
      *data: pytrees (support batch, task batch) the parameters are combined with.

    Returns:
      ``params`` itself when no data leaf varies over any axis (always, outside
      ``shard_map``); otherwise ``params`` with each leaf that is not yet varying
      over all those axes cast by ``pcast(..., to="varying")``: same values,
      varying type.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = jnp.zeros(2)
      >>> like_data(params, jnp.ones((4, 2))) is params  # nothing varies here
      True
    """
    axes = frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(data)))
    if not axes:
        return params

    def cast(x):
        # Sorted by name so the traced program does not depend on set order.
        missing = tuple(sorted(axes - varying_axes(x), key=str))
        if not missing:
            return x
        if _pcast is not None:
            return _pcast(x, missing, to="varying")
        return _pvary(x, missing)

    return jax.tree.map(cast, params)
