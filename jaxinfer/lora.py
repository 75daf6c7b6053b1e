"""Several LoRA adapters served side by side: each batch row picks its own (vLLM's
per-request LoRA), over one copy of the base weights.

    stack = LoraStack(a={"wq": [L, A, in, R], ...}, b={"wq": [L, A, R, out], ...})
    x @ W  becomes  x @ W + (x @ a[l, id_b]) @ b[l, id_b]      per row b, layer l

Adapter 0 is all zeros (the base model), so rows without an adapter share the batch with
rows that have one, and the ids are traced: switching adapters never recompiles. Ranks
are padded to the largest (R) with zeros, and each adapter's alpha / r scale is folded
into b, so the delta is exact. The base may be quantized: the delta is computed beside
`dot`, never merged. Reading: convert/lora.py (PEFT directories) -> `stack_adapters`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.errors import BadRequestError


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraStack:
    """Every loaded adapter's factors, per weight-tree key of the projections any of them
    targets: a [L, A, in, R], b [L, A, R, out] (in and out flattened in our layout's order,
    b scaled). Index 0 of A is the zero adapter."""

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]

    @property
    def num_adapters(self) -> int:
        """Adapters stacked, the zero adapter included."""
        return next(iter(self.a.values())).shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraLinear:
    """A projection weight with each row's adapter bound to it (one layer's slice): `dot`
    adds the row's low-rank delta to the base product."""

    base: Any  # the weight: an array or a quant.QArray
    a: jax.Array  # [A, in, R]
    b: jax.Array  # [A, R, out]
    ids_B: jax.Array  # i32[B] each row's adapter


def index_of(names: Sequence[str | None], name: str | None) -> int:
    """The stack index of adapter `name` among `names` (adapter i + 1's; None: a free
    slot), 0 for None (the base model); BadRequestError naming the loaded ones."""
    if name is None:
        return 0
    if name not in names:
        loaded = [n for n in names if n is not None]
        raise BadRequestError(f"unknown LoRA adapter {name!r} (loaded: {loaded or 'none'})",
                              "adapter")
    return list(names).index(name) + 1


def bind(w: dict[str, Any], a: dict[str, jax.Array], b: dict[str, jax.Array],
         ids_B: jax.Array) -> dict[str, Any]:
    """A layer's weights with the stacked adapters' keys wrapped as LoraLinear."""
    return {k: LoraLinear(v, a[k], b[k], ids_B) if k in a else v for k, v in w.items()}


def delta(x: jax.Array, w: LoraLinear, out_shape: tuple[int, ...]) -> jax.Array:
    """The rows' adapter deltas for x [B, T, in...] -> [B, T, out...]: two thin einsums
    over each row's gathered factors, in float32."""
    B, T = x.shape[:2]
    a_BiR = jnp.take(w.a, w.ids_B, axis=0)
    b_BRo = jnp.take(w.b, w.ids_B, axis=0)
    h = jnp.einsum("BTi,BiR->BTR", x.reshape(B, T, -1), a_BiR,
                   preferred_element_type=jnp.float32)
    d = jnp.einsum("BTR,BRo->BTo", h, b_BRo.astype(jnp.float32))
    return d.reshape(B, T, *out_shape)


@functools.partial(jax.jit, donate_argnums=0)
def replace_adapter(stack: LoraStack, index: jax.Array, a: dict[str, jax.Array],
                    b: dict[str, jax.Array]) -> LoraStack:
    """The stack (donated: a large stack is never held twice) with adapter `index`
    (traced: one compile) set to a [L, in, R] and b [L, R, out] per projection."""
    return LoraStack(a={k: v.at[:, index].set(a[k].astype(v.dtype)) for k, v in stack.a.items()},
                     b={k: v.at[:, index].set(b[k].astype(v.dtype)) for k, v in stack.b.items()})
