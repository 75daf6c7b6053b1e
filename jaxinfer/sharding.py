"""Mesh axes and the one table from logical axes to mesh axes.

Weights and activations have separate rules: weights shard heads/MLP width over `model`
(tensor parallelism), a mixture of experts' experts over `expert` (expert parallelism)
and optionally `embed` over `data` (FSDP); activations shard the batch over `expert` and
`data`. A dimension that does not divide its mesh axis is replicated with a warning
(SmolLM2's 9 query heads on a 2-way `model` axis), never a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.errors import ConfigError

log = logging.getLogger(__name__)

# Outermost first: `model` (the most communication per step) gets neighbouring devices.
MESH_AXES = ("data", "expert", "model")
EXPERT_AXIS = "expert"

# logical axis -> mesh axis (or None). The single table; see docs/sharding.md.
WEIGHT_RULES: dict[str, str | None] = {
    "vocab": "model",
    "embed": None,  # "data" under FSDP
    "q_heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "experts": "expert",  # MoE: expert parallelism; each expert is also split over mlp
    "router_experts": None,  # the router's tiny logits: every device routes every token
    "latent": None,  # latent attention's low-rank dims (DeepSeek): every device has them
    "layers": None,
    "norm": None,
    "group": None,  # quantization groups
}
ACTIVATION_RULES: dict[str, str | tuple[str, ...] | None] = {
    # expert-major, so moe.py's shard_map over `expert` finds its tokens in place: with an
    # `expert` axis attention is data-parallel over it too (no replicated K/V)
    "batch": ("expert", "data"),
    "seq": None,
    "cache_seq": None,
    "act_embed": None,
    "act_q_heads": "model",
    "act_kv_heads": "model",
    "act_head_dim": None,
    "act_mlp": "model",
    "act_vocab": "model",
    "layers": None,
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    weights: dict[str, str | tuple[str, ...] | None]
    activations: dict[str, str | tuple[str, ...] | None]

    @classmethod
    def default(cls, fsdp: bool = False) -> ShardingRules:
        w = dict(WEIGHT_RULES)
        if fsdp:
            w["embed"] = "data"
        return cls(w, dict(ACTIVATION_RULES))


def parse_mesh(spec: str) -> dict[str, int]:
    """'data:2,model:4' -> {'data': 2, 'model': 4}; raises ConfigError naming bad input."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition(":")
        if name not in MESH_AXES:
            raise ConfigError(f"unknown mesh axis {name!r} in --mesh={spec!r}; use {MESH_AXES}")
        if name in out:
            raise ConfigError(f"mesh axis {name!r} is given twice in --mesh={spec!r}")
        try:
            out[name] = int(size)
        except ValueError:
            raise ConfigError(f"bad mesh axis size {size!r} in --mesh={spec!r}") from None
        if out[name] <= 0:
            raise ConfigError(f"mesh axis {name} must be positive in --mesh={spec!r}")
    return out


def make_mesh(spec: str | dict[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with Auto axes ('data', 'expert', 'model') over `devices` (default: all,
    on `data`)."""
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec or {})
    devices = list(jax.devices() if devices is None else devices)
    shape = [sizes.get(a, 1) for a in MESH_AXES]
    if not sizes:
        shape = [len(devices)] + [1] * (len(MESH_AXES) - 1)
    if math.prod(shape) < len(devices) and sizes:
        devices = devices[: math.prod(shape)]  # e.g. model:3 on an 8-device host
    if math.prod(shape) != len(devices):
        want = dict(zip(MESH_AXES, shape, strict=True))
        raise ConfigError(f"mesh {want} needs {math.prod(shape)} devices, "
                          f"but {len(devices)} are available")
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def _fit(want: tuple[str, ...], n: int | None, sizes: dict[str, int]) -> tuple[str, ...]:
    """The most of `want`'s mesh axes whose product divides n, in `want`'s order; among
    equally many, the later axes first (('expert', 'data') falls back to 'data')."""
    for k in range(len(want), 0, -1):
        for pick in itertools.combinations(want[::-1], k):
            if n is None or n % math.prod(sizes[a] for a in pick) == 0:
                return tuple(a for a in want if a in pick)
    return ()


def logical_to_spec(axes: Sequence[str | None], rules: dict[str, str | tuple[str, ...] | None],
                    mesh: Mesh | jax.sharding.AbstractMesh, shape: Sequence[int] | None = None,
                    what: str = "", warn: bool = True) -> PartitionSpec:
    """Map logical axes to a PartitionSpec; non-dividing or repeated mesh axes replicate.
    A rule may name several mesh axes (the batch: 'expert' then 'data'); a dimension keeps
    as many of them as divide it."""
    sizes = dict(mesh.shape)
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for i, ax in enumerate(axes):
        m = rules.get(ax) if ax is not None else None
        names = (m,) if isinstance(m, str) else tuple(m or ())
        want = tuple(a for a in names if sizes.get(a, 1) > 1)
        if not want:
            out.append(None)
            continue
        if used & set(want):
            raise ConfigError(f"mesh axis {sorted(used & set(want))[0]!r} used twice in "
                              f"logical axes {tuple(axes)}")
        got = _fit(want, None if shape is None else shape[i], sizes)
        if got != want and warn:
            keep = f"sharding it over {' x '.join(got)}" if got else "replicating it"
            log.warning("%s: dim %s=%d does not divide mesh axis %s; %s", what or "array", ax,
                        shape[i], " x ".join(f"{a}={sizes[a]}" for a in want), keep)
        used.update(got)
        out.append(None if not got else got[0] if len(got) == 1 else got)
    return PartitionSpec(*out)


def activation_sharding(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None,
                        rules: ShardingRules | None = None, what: str = "activation"
                        ) -> NamedSharding:
    rules = rules or ShardingRules.default()
    return NamedSharding(mesh, logical_to_spec(axes, rules.activations, mesh, shape, what))


def _expert_size(mesh: Mesh | jax.sharding.AbstractMesh | None) -> int:
    return 1 if mesh is None or mesh.empty else dict(mesh.shape).get(EXPERT_AXIS, 1)


def expert_parallelism(mesh: Mesh | jax.sharding.AbstractMesh | None, num_experts: int) -> int:
    """How many ways the experts split over the mesh's `expert` axis (1: not split); the
    weight rules' fallback (experts that do not divide the axis are replicated) too."""
    n = _expert_size(mesh)
    return n if num_experts and num_experts % n == 0 else 1


def mesh_context(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """The mesh as JAX's context mesh where the program needs it at trace time: only an
    `expert` axis does (moe.py's shard_map), so other meshes keep the plain context."""
    return jax.set_mesh(mesh) if _expert_size(mesh) > 1 else contextlib.nullcontext()
