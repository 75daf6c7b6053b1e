"""Structured pruning: drop MLP channels and whole layers by importance on calibration text.

    calibrate(weights, tokens_BT, cfg) -> Importance
        channel_LF  mean over tokens of |silu(gate) * up|_f  x  ||w_down[f, :]||
                    (the size of channel f's contribution to the residual stream)
        layer_cos_L mean over tokens of cos(x_in, x_out) of each decoder layer: a layer whose
                    output points where its input did changes little (ShortGPT's "block
                    influence" is 1 - cos), so it is the cheapest to remove.
    prune_weights(weights, cfg, keep_layers, keep_channels_LF) -> (cfg', weights')
The result is an ordinary, smaller weight tree (new num_layers / mlp_dim) that
checkpoint.save_checkpoint writes and every script loads. Also here: the calibration /
evaluation text helpers shared with distill.py (token windows, perplexity).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.attention import ref_attention
from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.kv_cache import KVCache
from jaxinfer.layers import rms_norm
from jaxinfer.model import hidden_states, qkv, unembed
from jaxinfer.weights import Weights


@dataclasses.dataclass
class Importance:
    channel_LF: np.ndarray  # f32[L, F] higher = more important
    layer_cos_L: np.ndarray  # f32[L] higher = more redundant


def _layer(cfg: ModelConfig, x_BTD: jax.Array, w: Weights):
    """One decoder layer without a cache (as model._block), plus its statistics."""
    B, T, _ = x_BTD.shape
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    q, k, v = qkv(cfg, w, rms_norm(x_BTD, w["attn_norm"], cfg.rms_norm_eps), pos_BT,
                  context=T)
    o = ref_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), pos_BT)
    x1 = x_BTD + jnp.einsum("BTNH,NHD->BTD", o, w["wo"])
    h = rms_norm(x1, w["mlp_norm"], cfg.rms_norm_eps)
    a_BTF = (jax.nn.silu(jnp.einsum("BTD,DF->BTF", h, w["w_gate"]))
             * jnp.einsum("BTD,DF->BTF", h, w["w_up"]))
    x2 = x1 + jnp.einsum("BTF,FD->BTD", a_BTF, w["w_down"])
    act_F = jnp.mean(jnp.abs(a_BTF.astype(jnp.float32)), axis=(0, 1))
    xi, xo = x_BTD.astype(jnp.float32), x2.astype(jnp.float32)
    cos = jnp.mean(jnp.sum(xi * xo, -1) / (jnp.linalg.norm(xi, axis=-1)
                                           * jnp.linalg.norm(xo, axis=-1) + 1e-12))
    return x2, (act_F, cos)


@functools.partial(jax.jit, static_argnames=("cfg",))
def calibration_pass(weights: Weights, tokens_BT: jax.Array, cfg: ModelConfig):
    """Logits [B, T, V] and per-layer stats (mean |activation| [L, F], cos [L])."""
    x = jnp.take(weights["embed"], tokens_BT, axis=0)
    x, (act_LF, cos_L) = jax.lax.scan(functools.partial(_layer, cfg), x, weights["layers"])
    x = rms_norm(x, weights["final_norm"], cfg.rms_norm_eps)
    return unembed(weights, x, cfg), act_LF, cos_L


def calibrate(weights: Weights, batches_NBT: Sequence[np.ndarray], cfg: ModelConfig
              ) -> Importance:
    """Average the statistics over calibration batches of token windows."""
    if not cfg.llama_layers:
        raise ConfigError(f"importance calibration reads Llama-family layers; {cfg.name} is "
                          "not one (prune it with explicit keep_layers / keep_channels)")
    if not len(batches_NBT):
        raise ConfigError("calibration needs at least one batch of tokens, got 0")
    act, cos = 0.0, 0.0
    for tokens in batches_NBT:
        _, a, c = calibration_pass(weights, jnp.asarray(tokens, jnp.int32), cfg)
        act, cos = act + np.asarray(a), cos + np.asarray(c)
    act, cos = act / len(batches_NBT), cos / len(batches_NBT)
    w_down_norm_LF = np.linalg.norm(np.asarray(weights["layers"]["w_down"], np.float32), axis=-1)
    return Importance(channel_LF=act * w_down_norm_LF, layer_cos_L=cos)


def layers_to_keep(layer_cos_L: np.ndarray, num_layers: int) -> list[int]:
    """Keep `num_layers` layers, dropping the most redundant (highest cos) ones."""
    L = len(layer_cos_L)
    if not 1 <= num_layers <= L:
        raise ConfigError(f"num_layers must be in [1, {L}], got {num_layers}")
    drop = np.argsort(-np.asarray(layer_cos_L), kind="stable")[: L - num_layers]
    return sorted(set(range(L)) - {int(i) for i in drop})


def evenly_spaced_layers(L: int, num_layers: int) -> list[int]:
    """Every other layer (generally: evenly spaced, first and last kept)."""
    if not 1 <= num_layers <= L:
        raise ConfigError(f"num_layers must be in [1, {L}], got {num_layers}")
    return sorted({int(round(i)) for i in np.linspace(0, L - 1, num_layers)})


def channels_to_keep(channel_LF: np.ndarray, mlp_dim: int) -> np.ndarray:
    """Per layer, the `mlp_dim` highest-scoring channels in their original order, i32[L, F']."""
    F = channel_LF.shape[1]
    if not 1 <= mlp_dim <= F:
        raise ConfigError(f"mlp_dim must be in [1, {F}], got {mlp_dim}")
    top = np.argsort(-np.asarray(channel_LF), axis=1, kind="stable")[:, :mlp_dim]
    return np.sort(top, axis=1).astype(np.int32)


def prune_weights(weights: Weights, cfg: ModelConfig, keep_layers: Sequence[int],
                  keep_channels_LF: np.ndarray | None = None) -> tuple[ModelConfig, Weights]:
    """Slice the weight tree: layers `keep_layers`, then per kept layer the channel indices
    `keep_channels_LF` (rows of the original layer numbering, [L, F'] or [len(keep), F'])."""
    keep = np.asarray(sorted(keep_layers), np.int32)
    if keep.size == 0 or keep.min() < 0 or keep.max() >= cfg.num_layers:
        raise ConfigError(f"keep_layers must be in [0, {cfg.num_layers}), got {list(keep)}")
    layers = {n: np.asarray(a)[keep] for n, a in weights["layers"].items()}
    mlp_dim = cfg.mlp_dim
    if keep_channels_LF is not None:
        ch = np.asarray(keep_channels_LF)
        ch = ch[keep] if ch.shape[0] == cfg.num_layers else ch
        if ch.shape[0] != len(keep) or ch.min() < 0 or ch.max() >= cfg.mlp_dim:
            raise ConfigError(f"keep_channels must be [L, F'] indices below {cfg.mlp_dim}, "
                              f"got shape {ch.shape}")
        mlp_dim = ch.shape[1]
        for n in ("w_gate", "w_up"):
            layers[n] = np.take_along_axis(layers[n], ch[:, None, :], axis=2)
        layers["w_down"] = np.take_along_axis(layers["w_down"], ch[:, :, None], axis=1)
    out = {**weights, "layers": {n: jnp.asarray(a) for n, a in layers.items()}}
    local = tuple(cfg.local_layers[i] for i in keep) if cfg.local_layers else ()
    return cfg.replace(num_layers=len(keep), mlp_dim=mlp_dim, local_layers=local), out


# ---- calibration / evaluation text --------------------------------------------------------
def text_ids(path: str | Path, tokenizer) -> np.ndarray:
    """All tokens of a UTF-8 text file, i32[N]."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read text file {str(path)!r}: {e}") from e
    ids = np.asarray(tokenizer.encode(text), np.int32)
    if ids.size < 2:
        raise ConfigError(f"text file {str(path)!r} has fewer than 2 tokens")
    return ids


def split_ids(ids: np.ndarray, held_out: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out): the held-out part is the tail, so it shares no windows."""
    n = int(len(ids) * (1 - held_out))
    return ids[:n], ids[n:]


def windows(ids: np.ndarray, length: int, batch: int, max_batches: int | None = None
            ) -> list[np.ndarray]:
    """Consecutive non-overlapping windows [batch, length] covering `ids` (tail dropped)."""
    n = len(ids) // length
    if n < batch:
        raise ConfigError(f"text has {len(ids)} tokens: too few for {batch} windows of "
                          f"{length}")
    w = ids[: n * length].reshape(n, length)
    out = [w[i: i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:max_batches] if max_batches else out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _nll_sum(weights: Weights, tokens_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
    B, T = tokens_BT.shape
    shape = (cfg.num_layers, B, cfg.num_kv_heads, T, cfg.head_dim)
    dtype = weights["embed"].dtype
    cache = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((B,), jnp.int32))
    x, _ = hidden_states(weights, tokens_BT[:, :-1], cache, cfg)
    logp = jax.nn.log_softmax(unembed(weights, x, cfg), -1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens_BT[:, 1:, None], -1))


def perplexity(weights: Weights, cfg: ModelConfig, ids: np.ndarray, seq_len: int = 256,
               batch: int = 4) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of seq_len + 1 tokens."""
    total, count = 0.0, 0
    batch = max(1, min(batch, len(ids) // (seq_len + 1)))  # a short held-out text still works
    for w in windows(ids, seq_len + 1, batch):
        total += float(_nll_sum(weights, jnp.asarray(w), cfg))
        count += w.shape[0] * seq_len
    return float(np.exp(total / count))


def prune_checkpoint(checkpoint: str | Path, text_file: str | Path, output: str | Path,
                     num_layers: int | None = None, mlp_dim: int | None = None,
                     seq_len: int = 256, batch_size: int = 4, calib_batches: int = 4,
                     held_out: float = 0.1, evaluate: bool = True,
                     mesh: jax.sharding.Mesh | None = None) -> dict:
    """Calibrate on the text's head, prune, write `output`; perplexity on the held-out tail
    before and after. Returns a summary (layers kept, sizes, perplexities)."""
    from jaxinfer.checkpoint import load_checkpoint, save_checkpoint
    from jaxinfer.tokenizer import load_tokenizer
    from jaxinfer.weights import count_params, weight_shardings, weight_specs

    checkpoint = Path(checkpoint)
    shardings = None
    if mesh is not None:  # restore each weight straight into its shards
        shardings = weight_shardings(weight_specs(ModelConfig.load(checkpoint / "config.json")),
                                     mesh)
    cfg, weights = load_checkpoint(checkpoint, shardings=shardings)
    tokenizer = load_tokenizer(checkpoint / "tokenizer")
    train, test = split_ids(text_ids(text_file, tokenizer), held_out)
    imp = calibrate(weights, windows(train, seq_len, batch_size, calib_batches), cfg)
    keep = layers_to_keep(imp.layer_cos_L, num_layers or cfg.num_layers)
    ch = (channels_to_keep(imp.channel_LF, mlp_dim)
          if mlp_dim and mlp_dim != cfg.mlp_dim else None)
    new_cfg, new_w = prune_weights(weights, cfg, keep, ch)
    save_checkpoint(output, new_cfg, new_w, checkpoint / "tokenizer")
    summary = {"layers_kept": keep, "num_layers": new_cfg.num_layers,
               "mlp_dim": new_cfg.mlp_dim,
               "params": count_params(weight_specs(new_cfg)),
               "teacher_params": count_params(weight_specs(cfg)),
               "layer_cos": [round(float(c), 4) for c in imp.layer_cos_L]}
    if evaluate and len(test) > seq_len:  # needs one held-out window of seq_len + 1
        summary["perplexity_before"] = perplexity(weights, cfg, test, seq_len, batch_size)
        summary["perplexity_after"] = perplexity(new_w, new_cfg, test, seq_len, batch_size)
    return summary
