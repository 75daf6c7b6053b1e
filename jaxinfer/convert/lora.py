"""LoRA adapters (Hugging Face PEFT directories) merged into a model's weights.

    adapter = read_lora("my-adapter/", cfg)      # adapter_config.json + adapter_model.safetensors
    params = merge_lora(params, adapter)          # W + (alpha / r) * B @ A, in our layout

A PEFT LoRA adapter is the usual product of fine-tuning a released model; merged, it costs
nothing at inference. Several adapters served side by side, each request picking one
(vLLM's multi-LoRA), are stacked unmerged instead: `stack_adapters` -> lora.LoraStack.
The deltas are HF [out, in] matrices and go through the same layout table as HF weights
(`safetensors.hf_linears`). Supported: LoRA on any of the seven projections of each layer
(Phi-3's fused qkv_proj and gate_up_proj, GPT-NeoX's per-head query_key_value too: B split
by rows, A shared), `use_rslora`
(alpha / sqrt(r)); refused with a ConversionError naming the file: DoRA, LoRA
biases, embedding or lm_head adapters, `modules_to_save`, per-module rank or alpha patterns,
and an adapter whose shapes do not fit the model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.convert.layout import neox_qkv_split, to_rotate_half
from jaxinfer.convert.safetensors import FUSED, fused_rows, hf_linears, hf_shape
from jaxinfer.errors import ConversionError
from jaxinfer.lora import LoraStack, replace_adapter

_KEY = re.compile(r"(?:base_model\.model\.)?(?:model|gpt_neox)\.layers\.(\d+)\."
                  r"([a-z_]+\.[a-z_0-9]+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight")

_NEOX_QKV = "attention.query_key_value"  # GPT-NeoX's fused q/k/v


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One projection's adapter over every layer, in HF's orientation: delta W[l] (HF
    [out, in]) = scale * B[l] @ A[l]. Layers the adapter leaves alone have zero factors.
    Kept low-rank (r << in, out) so a merge never holds a full-size delta on the host."""

    a: np.ndarray  # [L, r, in]
    b: np.ndarray  # [L, out, r]
    scale: float
    shape: tuple[int, ...]  # the weight's shape in our layout, without L

    def delta(self, layer: int | slice = slice(None)) -> np.ndarray:
        """delta W in our layout, for one layer or all."""
        a, b = self.a[layer], self.b[layer]
        d = np.einsum("...ri,...or->...io", a, b) * np.float32(self.scale)
        return d.reshape(*d.shape[:-2], *self.shape)


def read_lora(path: str | Path, cfg: ModelConfig) -> dict[str, LoraFactors]:
    """The adapter's factors per weight-tree key (only the projections it targets)."""
    _check_supported(cfg)
    path = Path(path)
    conf_file, tensors_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not conf_file.is_file() or not tensors_file.is_file():
        raise ConversionError(f"not a PEFT LoRA adapter directory (needs adapter_config.json "
                              f"and adapter_model.safetensors): {path}")
    try:
        conf = json.loads(conf_file.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {conf_file}: {e}") from e
    scale = _scale(conf, conf_file)
    tensors = _read_tensors(tensors_file)
    linears = hf_linears(cfg)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    fused = {whole for whole, _ in FUSED.values()} | {_NEOX_QKV}
    for name, a in tensors.items():
        m = _KEY.fullmatch(name)
        if m is None or m.group(2) not in linears.keys() | fused:
            raise ConversionError(f"{tensors_file}: unsupported adapter tensor {name!r} (LoRA "
                                  f"on the projections {sorted(linears)} only)")
        layer = int(m.group(1))
        if not 0 <= layer < cfg.num_layers:
            raise ConversionError(f"{tensors_file}: tensor {name!r} names layer {layer}; the "
                                  f"model has {cfg.num_layers}")
        pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = a
    if not pairs:
        raise ConversionError(f"{tensors_file} holds no LoRA tensors")
    for (layer, module), ab in list(pairs.items()):  # Phi-3: one A, B split by rows
        if module in fused:
            if set(ab) != {"A", "B"}:
                raise ConversionError(f"{tensors_file}: layer {layer} {module} lacks lora_"
                                      f"{'B' if 'A' in ab else 'A'}")
            del pairs[layer, module]
            b = ab["B"]
            if module == _NEOX_QKV:  # its rows per head [N, 3, H] -> Phi-3's [3, N, H]
                b = neox_qkv_split(b, cfg.num_heads)
                module = FUSED["self_attn.q_proj"][0]
            for part, (whole, at) in FUSED.items():
                if whole == module:
                    rows = hf_shape(*linears[part][1:])[0]
                    pairs[layer, part] = {**ab, "B": b[fused_rows(at, rows, len(b))]}
    out: dict[str, LoraFactors] = {}
    for (layer, module), ab in sorted(pairs.items()):
        key, shape, n_in = linears[module]
        n_out, n_inp = hf_shape(shape, n_in)
        if set(ab) != {"A", "B"}:
            raise ConversionError(f"{tensors_file}: layer {layer} {module} lacks lora_"
                                  f"{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != n_inp or b.shape[0] != n_out \
                or a.shape[0] != b.shape[1]:
            raise ConversionError(f"{tensors_file}: layer {layer} {module} has lora_A "
                                  f"{a.shape} and lora_B {b.shape}; the model needs "
                                  f"[r, {n_inp}] and [{n_out}, r]")
        if cfg.rope_interleaved and key in ("wq", "wk"):  # Cohere, GLM: as weights are read
            b = to_rotate_half(b, shape[1], cfg.rope_dim)
        r = a.shape[0]
        if key not in out:
            L = cfg.num_layers
            out[key] = LoraFactors(np.zeros((L, r, n_inp), np.float32),
                                   np.zeros((L, n_out, r), np.float32), scale(r), shape)
        f = out[key]
        if f.a.shape[1] != r:
            raise ConversionError(f"{tensors_file}: {module} has rank {r} in layer {layer} "
                                  f"but {f.a.shape[1]} elsewhere")
        f.a[layer], f.b[layer] = a, b
    return out


def _check_supported(cfg: ModelConfig) -> None:
    if cfg.kv_lora_rank:
        raise ConversionError(f"LoRA adapters on latent attention ({cfg.name}) are not "
                              "supported")


def _scale(conf: dict[str, Any], file: Path):
    """r -> the adapter's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA); refuses
    what a merge of A and B alone would get wrong."""
    if conf.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{file}: peft_type {conf.get('peft_type')!r} is not LORA")
    for field, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if conf.get(field, ok) != ok:
            raise ConversionError(f"{file}: {field}={conf[field]!r} is not supported "
                                  f"(only {ok!r})")
    for field in ("modules_to_save", "rank_pattern", "alpha_pattern"):
        if conf.get(field):
            raise ConversionError(f"{file}: {field} is not supported")
    alpha = conf.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ConversionError(f"{file}: lora_alpha must be a number, got {alpha!r}")
    rs = bool(conf.get("use_rslora", False))
    return lambda r: alpha / (math.sqrt(r) if rs else r)


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            return {k: np.asarray(f.get_tensor(k)).astype(np.float32) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        raise ConversionError(f"cannot read {file}: {e}") from e


def merge_lora(weights: dict[str, Any], adapter: dict[str, LoraFactors]) -> dict[str, Any]:
    """`weights` with the adapter merged, each leaf in its dtype and sharding. numpy leaves
    (conversion) take one layer's delta at a time; device arrays take the low-rank factors
    and form the delta inside one jitted add (the weight donated), so no full-size delta
    exists on the host. Quantized leaves cannot take a delta: merge before quantizing."""
    import jax.numpy as jnp

    layers = dict(weights["layers"])
    for key, f in adapter.items():
        w = layers[key]
        if not hasattr(w, "dtype") or not jnp.issubdtype(w.dtype, jnp.floating):
            raise ConversionError(f"cannot merge a LoRA adapter into quantized weights "
                                  f"({key}); merge into the float checkpoint, then quantize")
        if isinstance(w, np.ndarray):
            w = w.copy()
            for i in range(w.shape[0]):
                w[i] = (w[i].astype(np.float32) + f.delta(i)).astype(w.dtype)
            layers[key] = w
        else:
            layers[key] = _merge_jit(f.scale, f.shape, w.sharding)(w, f.a, f.b)
    return {**weights, "layers": layers}


@functools.cache
def _merge_jit(scale: float, shape: tuple[int, ...], sharding: Any):
    import jax
    import jax.numpy as jnp

    def merge(w, a, b):
        d = jnp.einsum("lri,lor->lio", a, b) * scale
        return (w.astype(jnp.float32) + d.reshape(w.shape[0], *shape)).astype(w.dtype)

    return jax.jit(merge, out_shardings=sharding, donate_argnums=0)


def stack_adapters(adapters: list[dict[str, LoraFactors]], dtype, cfg: ModelConfig | None = None,
                   slots: int = 0, rank: int = 0) -> LoraStack:
    """Adapters 1..A (0 is the zero adapter) as one LoraStack in `dtype`: their
    projections, ranks zero-padded to the largest, scales folded into b. An adapter that
    leaves a projection alone has zero factors there. With `cfg`, room for adapters loaded
    later (`put_adapter`): every projection of the model, at least `slots` adapters and
    rank `rank`."""
    import jax.numpy as jnp

    if not adapters and cfg is None:
        raise ValueError("stack_adapters needs an adapter, or cfg to make room for some")
    if cfg is not None:
        _check_supported(cfg)
    dims = ({key: hf_shape(shape, n_in) for key, shape, n_in in hf_linears(cfg).values()}
            if cfg is not None else {})
    for ad in adapters:
        for key, f in ad.items():
            dims.setdefault(key, (f.b.shape[1], f.a.shape[2]))
    R = max([rank] + [f.a.shape[1] for ad in adapters for f in ad.values()])
    A = max(slots, len(adapters))
    L = (cfg.num_layers if cfg is not None
         else next(iter(adapters[0].values())).a.shape[0])
    a_out, b_out = {}, {}
    for key, (n_out, n_in) in sorted(dims.items()):
        a = np.zeros((L, A + 1, n_in, R), np.float32)
        b = np.zeros((L, A + 1, R, n_out), np.float32)
        for j, ad in enumerate(adapters, 1):
            a[:, j], b[:, j] = _padded(ad, key, L, n_in, n_out, R)
        a_out[key], b_out[key] = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    return LoraStack(a=a_out, b=b_out)


def _padded(ad: dict[str, LoraFactors], key: str, L: int, n_in: int, n_out: int, R: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """One adapter's factors of projection `key` as [L, in, R] and scaled [L, R, out]."""
    a, b = np.zeros((L, n_in, R), np.float32), np.zeros((L, R, n_out), np.float32)
    if key in ad:
        f = ad[key]
        r = f.a.shape[1]
        a[:, :, :r] = f.a.transpose(0, 2, 1)
        b[:, :r, :] = f.b.transpose(0, 2, 1) * np.float32(f.scale)
    return a, b


def put_adapter(stack: LoraStack, index: int, adapter: dict[str, LoraFactors],
                where: str = "adapter") -> LoraStack:
    """`stack` (donated: use the returned one) with adapter `index` replaced by `adapter`.
    ConversionError, the stack untouched, if it does not fit the stack's room: a
    projection the stack lacks, or a rank above the stack's."""
    missing = sorted(set(adapter) - set(stack.a))
    if missing:
        raise ConversionError(f"{where} adapts {missing}, which this stack has no room for "
                              f"(it has {sorted(stack.a)})")
    R = next(iter(stack.a.values())).shape[-1]
    r = max(f.a.shape[1] for f in adapter.values())
    if r > R:
        raise ConversionError(f"{where} has rank {r}; this stack holds rank <= {R} "
                              "(max_lora_rank)")
    a, b = {}, {}
    for key, x in stack.a.items():
        L, _, n_in, _ = x.shape
        a[key], b[key] = _padded(adapter, key, L, n_in, stack.b[key].shape[-1], R)
    return replace_adapter(stack, np.int32(index), a, b)


def with_room(stack: LoraStack | None, cfg: ModelConfig, slots: int, rank: int, dtype,
              place: Any = None) -> LoraStack:
    """`stack` (None: no adapters yet) widened to room for `slots` adapters in all, of
    rank <= `rank`, on every projection (`put_adapter` fills it while serving); its
    adapters keep their indices. Placed on `place` (a device or a sharding) if given."""
    import jax

    A = 0 if stack is None else stack.num_adapters - 1
    R0 = 0 if stack is None else next(iter(stack.a.values())).shape[-1]
    room = stack_adapters([], dtype, cfg, max(slots, A), max(rank, R0))
    if stack is not None:
        room = LoraStack(
            a={k: v.at[:, :A + 1, :, :R0].set(stack.a[k]) if k in stack.a else v
               for k, v in room.a.items()},
            b={k: v.at[:, :A + 1, :R0, :].set(stack.b[k]) if k in stack.b else v
               for k, v in room.b.items()})
    return room if place is None else jax.device_put(room, place)
