"""GGUF Q8_0 / Q4_0 / Q4_1 blocks straight into QArrays, without a float round trip.

A ggml block covers 32 consecutive inputs of one output row: an f16 scale d (and for Q4_1
an f16 min m) and 32 integers q. The file's own numbers are kept:
    Q8_0  w = d * q,              q int8          -> int8, group 32
    Q4_0  w = d * (q - 8),        q in [0, 15]    -> int4 (q - 8), group 32
    Q4_1  w = d * q + m                           -> int4 (q - 8), offsets m + 8 d
Q4 nibbles: byte j holds input j (low) and input j + 16 (high). Rows are outputs, so the
llama.cpp Q/K row permutation moves values and scales together, and the transpose into
the jaxinfer layout puts the 32-wide groups on the contraction axis.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.convert.hf_quant import ggml_mxfp4_int8
from jaxinfer.errors import ConversionError
from jaxinfer.quant import QArray, QuantConfig, QuantSpec
from jaxinfer.weights import EMBED_QUANT_AXES, LINEAR_QUANT_AXES

BLOCK = 32
# ggml type name -> (bits, offsets, bytes per block)
QTYPES = {"Q8_0": (8, False, 34), "Q4_0": (4, False, 18), "Q4_1": (4, True, 20)}
_LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
           "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def _type(t: Any) -> str:
    return t.tensor_type.name


def expert_tensors(tensors: dict[str, Any], name: str, num_experts: int) -> list[Any] | None:
    """One layer's experts of `name` (`blk.3.ffn_gate_exps.weight`): the one stacked tensor
    llama.cpp writes now, or the per-expert tensors (`blk.3.ffn_gate.0.weight`, ...) of
    files from before it stacked them (early Mixtral GGUFs), in expert order; None if the
    file has neither."""
    if name in tensors:
        return [tensors[name]]
    parts = [tensors.get(_one_expert(name, e)) for e in range(num_experts)]
    return parts if all(t is not None for t in parts) else None


def stacked_experts(get: Callable[..., np.ndarray], tensors: dict[str, Any], name: str,
                    num_experts: int, shape: tuple[int, ...]) -> np.ndarray:
    """A layer's experts `name` as one float array of `shape` [E, out, in] (numpy order)
    read by `get`, from either layout `expert_tensors` finds."""
    parts = expert_tensors(tensors, name, num_experts)
    if parts is None or len(parts) == 1:  # stacked (or neither: `get` names what is missing)
        return get(name, shape)
    return np.stack([get(_one_expert(name, e), shape[1:]) for e in range(num_experts)])


def _one_expert(name: str, e: int) -> str:
    """`blk.3.ffn_gate_exps.weight` -> expert e's own tensor in older files."""
    blk, gname, kind = name.rsplit(".", 2)
    return f"{blk}.{gname.removesuffix('_exps')}.{e}.{kind}"


def shape_of(t: Any) -> tuple[int, ...]:
    """A GGUF tensor's shape in numpy order (ggml lists dims innermost first)."""
    return tuple(int(s) for s in reversed(t.shape))


def quant_config(tensors: dict[str, Any], cfg: ModelConfig, path: Path) -> QuantConfig:
    """The QuantConfig that keeps this file's blocks, or ConversionError naming the types
    that cannot be kept (K-quants, mixed types across the linear layers)."""
    lin = {_type(t) for i in range(cfg.num_layers) for n in _LINEAR
           for t in expert_tensors(tensors, f"blk.{i}.{n}.weight", cfg.num_experts) or ()}
    emb = {_type(tensors[n]) for n in ("token_embd.weight", "output.weight") if n in tensors}
    bad = (len(lin) != 1 or not lin <= QTYPES.keys() or len(emb) != 1
           or not emb <= QTYPES.keys() | {"F32", "F16", "BF16"})
    if bad:
        raise ConversionError(
            f"cannot keep the quantized blocks of GGUF file {path}: linear layers are "
            f"{sorted(lin)}, embeddings {sorted(emb)}; direct import needs one of "
            f"{sorted(QTYPES)} throughout the linear layers (convert to float and quantize "
            "with --quantize=int8 or int4 instead)")
    spec = lambda name: QuantSpec(QTYPES[name][0], BLOCK, QTYPES[name][1])
    (e,) = emb
    return QuantConfig(linear=spec(lin.pop()), embed=spec(e) if e in QTYPES else None)


def blocks(t: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A quantized tensor as (values int8 [R, C], scales f32 [R, C/32], offsets|None), its
    leading dims (experts, rows) flattened into R."""
    bits, has_min, nbytes = QTYPES[_type(t)]
    *outer, C = (int(s) for s in reversed(t.shape))
    R = int(np.prod(outer))
    b = np.asarray(t.data.view(np.ndarray)).reshape(R, C // BLOCK, nbytes)
    f16 = lambda lo, hi: np.ascontiguousarray(b[..., lo:hi]).view(np.float16)[..., 0].astype(
        np.float32)
    d = f16(0, 2)
    if bits == 8:
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8)
        return q.reshape(R, C), d, None
    qs = b[..., 4:] if has_min else b[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - 8
    return q.reshape(R, C), d, (f16(2, 4) + 8 * d if has_min else None)


def mxfp4_blocks(t: Any) -> tuple[np.ndarray, np.ndarray]:
    """A ggml MXFP4 tensor kept exactly as int8 (values int8 [R, C], scales f32
    [R, C / 32]: hf_quant.ggml_mxfp4_int8), its leading dims flattened into R."""
    raw = np.asarray(t.data.view(np.ndarray))
    return ggml_mxfp4_int8(raw.reshape(-1, raw.shape[-1]))


def _rows_to_layout(a: np.ndarray, shape: tuple[int, ...], group_axis: int, grouped: bool
                    ) -> np.ndarray:
    """[out rows, in cols] (values) or [out rows, in cols / 32] (scales) -> the jaxinfer
    layout `shape` of the weight, with the group count in place of the group axis."""
    out = list(shape)
    if grouped:
        out[group_axis] //= BLOCK
    return np.ascontiguousarray(a.T).reshape(out)


def qk_norms(cfg: ModelConfig, get: Callable[..., np.ndarray], fix: Callable | None = None
             ) -> dict[str, np.ndarray]:
    """The q/k norm weights, float in both imports: shared by the heads [L, H] (Qwen3) or per
    head [L, N, H] (OLMo 2, Cohere, StableLM); `fix` reorders interleaved RoPE pairs
    (Cohere's files)."""
    if not cfg.qk_norm:
        return {}
    H = cfg.head_dim
    shapes = ({"q_norm": (cfg.num_heads, H), "k_norm": (cfg.num_kv_heads, H)}
              if cfg.qk_norm_heads else {"q_norm": (H,), "k_norm": (H,)})
    fix = fix or (lambda w, heads: w)
    return {name: np.stack([fix(get(f"blk.{i}.attn_{name}.weight", (int(np.prod(s)),),
                                    reshape=True),
                                int(np.prod(s)) // H).reshape(s)
                            for i in range(cfg.num_layers)]) for name, s in shapes.items()}


def norms(cfg: ModelConfig, get: Callable[..., np.ndarray]) -> dict[str, np.ndarray]:
    """Each layer's norm weights [L, D], float in both imports: attn/ffn (attn only for a
    parallel block; with their biases for StableLM), and Gemma 2/3's norms of the
    attention and MLP outputs."""
    names = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm"} if cfg.pre_norms else {}
    if cfg.shared_input_norm:
        del names["mlp_norm"]
    if cfg.post_norms:
        names.update(post_attn_norm="post_attention_norm", post_mlp_norm="post_ffw_norm")
    kinds = {"": "weight", "_bias": "bias"} if cfg.norm_bias else {"": "weight"}
    return {key + suffix: np.stack([get(f"blk.{i}.{g}.{kind}", (cfg.d_model,))
                                    for i in range(cfg.num_layers)])
            for key, g in names.items() for suffix, kind in kinds.items()}


def final_norm(cfg: ModelConfig, get: Callable[..., np.ndarray]) -> dict[str, np.ndarray]:
    """The float tensors after the layers: output_norm's weight (its bias: StableLM,
    StarCoder2, Phi-2) and Phi-2's lm_head bias."""
    out = {"final_norm": get("output_norm.weight", (cfg.d_model,))}
    if cfg.norm_bias:
        out["final_norm_bias"] = get("output_norm.bias", (cfg.d_model,))
    if cfg.lm_head_bias:
        out["lm_head_bias"] = get("output.bias", (cfg.vocab_size,))
    return out


def layer_vectors(cfg: ModelConfig, get: Callable[..., np.ndarray]) -> dict[str, np.ndarray]:
    """The per-layer float vectors besides the norms, float in both imports: biases of
    attn_output, ffn_up and ffn_down (StarCoder2, Phi-2) or of attn_output and every expert
    (gpt-oss), the router's bias and the attention sinks (gpt-oss)."""
    L, D, F, N, E = (cfg.num_layers, cfg.d_model, cfg.mlp_dim, cfg.num_heads,
                     cfg.num_experts)
    todo = []
    if cfg.linear_bias:
        todo.append(("bo", "attn_output.bias", (D,)))
        todo += ([("moe_b_gate", "ffn_gate_exps.bias", (E, F)),
                  ("moe_b_up", "ffn_up_exps.bias", (E, F)),
                  ("moe_b_down", "ffn_down_exps.bias", (E, D))] if E else
                 [("b_up", "ffn_up.bias", (F,)), ("b_down", "ffn_down.bias", (D,))])
    if cfg.router_bias:
        todo.append(("router_b", "ffn_gate_inp.bias", (E,)))
    if cfg.attn_sinks:
        todo.append(("sinks", "attn_sinks.weight", (N,)))
    return {key: np.stack([get(f"blk.{i}.{g}", shape) for i in range(L)])
            for key, g, shape in todo}


def quantized_weights(cfg: ModelConfig, tensors: dict[str, Any], permuted: bool,
                      get: Callable[..., np.ndarray], fix: Callable, path: Path,
                      progress: Callable[[int, int], None] | None = None
                      ) -> tuple[QuantConfig, dict]:
    """The weight tree with QArray linear (and embedding) weights; `get` reads float
    tensors (norms, biases, float embeddings), `fix` is the Q/K row un-permutation."""
    qc = quant_config(tensors, cfg, path)
    L, D, F, N, K, H = (cfg.num_layers, cfg.d_model, cfg.mlp_dim, cfg.num_heads,
                        cfg.num_kv_heads, cfg.head_dim)
    if H % BLOCK:
        raise ConversionError(f"head_dim {H} of {path} is not a multiple of {BLOCK}: "
                              "ggml blocks would straddle heads")
    E = cfg.num_experts
    shapes = {"wq": (D, N, H), "wk": (D, K, H), "wv": (D, K, H), "wo": (N, H, D)}
    src = {"wq": ("attn_q", N), "wk": ("attn_k", K), "wv": ("attn_v", None),
           "wo": ("attn_output", None)}
    if E:  # stacked experts [E, out, in]
        shapes.update(moe_gate=(E, D, F), moe_up=(E, D, F), moe_down=(E, F, D))
        src.update(moe_gate=("ffn_gate_exps", None), moe_up=("ffn_up_exps", None),
                   moe_down=("ffn_down_exps", None))
        if cfg.shared_expert_dim:  # Qwen2-MoE's shared expert, a dense MLP
            Fs = cfg.shared_expert_dim
            shapes.update(shared_gate=(D, Fs), shared_up=(D, Fs), shared_down=(Fs, D))
            src.update(shared_gate=("ffn_gate_shexp", None), shared_up=("ffn_up_shexp", None),
                       shared_down=("ffn_down_shexp", None))
    else:
        shapes.update(w_up=(D, F), w_down=(F, D))
        src.update(w_up=("ffn_up", None), w_down=("ffn_down", None))
        if cfg.mlp_gated:
            shapes["w_gate"], src["w_gate"] = (D, F), ("ffn_gate", None)
    parts: dict[str, list] = {n: [] for n in shapes}
    for i in range(L):
        for name, (gname, heads) in src.items():
            ts = expert_tensors(tensors, f"blk.{i}.{gname}.weight", E)
            if ts is None:
                raise ConversionError(f"GGUF file {path} lacks tensor blk.{i}.{gname}.weight")
            v, s, o = (None if a[0] is None else np.concatenate(a)  # experts' rows in turn
                       for a in zip(*map(blocks, ts), strict=True))
            if permuted and heads:
                v, s, o = (None if a is None else fix(a, heads) for a in (v, s, o))
            parts[name].append((v, s, o))
        if progress:
            progress(i + 1, L)
    layers = {}
    for name, shape in shapes.items():
        ga = LINEAR_QUANT_AXES[name][1]
        if name.startswith("moe_"):  # [E * out, in] -> [E, in, out]
            stack = lambda j, grouped, name=name: np.stack(
                [np.ascontiguousarray(p[j].reshape(E, -1, p[j].shape[-1]).swapaxes(1, 2))
                 for p in parts[name]])
        else:
            stack = lambda j, grouped, name=name, shape=shape, ga=ga: np.stack(
                [_rows_to_layout(p[j], shape, ga, grouped) for p in parts[name]])
        layers[name] = _qarray(stack(0, False), stack(1, True),
                               stack(2, True) if qc.linear.offsets else None, qc.linear, ga)
    layers.update(norms(cfg, get))
    layers.update(qk_norms(cfg, get, fix if permuted else None))
    layers.update(layer_vectors(cfg, get))
    if E:  # the routers stay float
        layers["router"] = np.stack([get(f"blk.{i}.ffn_gate_inp.weight", (E, D)).T
                                     for i in range(L)])
        layers.update(shared_router(cfg, get))
    if cfg.qkv_bias:
        for b, gname, heads in (("bq", "attn_q", N), ("bk", "attn_k", K), ("bv", "attn_v", K)):
            rows = [get(f"blk.{i}.{gname}.bias", (heads * H,)) for i in range(L)]
            if permuted and b != "bv":
                rows = [fix(r, heads) for r in rows]
            layers[b] = np.stack(rows).reshape(L, heads, H)
    weights = {"layers": layers, **final_norm(cfg, get)}
    for name, gname in (("embed", "token_embd"), ("lm_head", "output")):
        t = tensors.get(f"{gname}.weight")
        if t is None:
            continue
        if qc.embed is None:  # float embeddings stay float
            weights[name] = get(f"{gname}.weight", (cfg.vocab_size, D))
            if name == "lm_head":
                weights[name] = np.ascontiguousarray(weights[name].T)
            continue
        v, s, o = blocks(t)
        if name == "lm_head":  # [V, D] -> [D, V]
            v, s, o = (None if a is None else np.ascontiguousarray(a.T) for a in (v, s, o))
        weights[name] = _qarray(v, s, o, qc.embed, EMBED_QUANT_AXES[name][1])
    return qc, weights


def _qarray(v: np.ndarray, s: np.ndarray, o: np.ndarray | None, spec: QuantSpec, ga: int
            ) -> QArray:
    return QArray(values=v.astype(spec.dtype), scales=s, offsets=o, group_axis=ga)


def shared_router(cfg: ModelConfig, get: Callable[..., np.ndarray]) -> dict[str, np.ndarray]:
    """Qwen2-MoE's shared-expert gate [L, D] (float in every file), if the model has one."""
    if not cfg.shared_expert_gate:
        return {}
    return {"shared_router": np.stack([get(f"blk.{i}.ffn_gate_inp_shexp.weight",
                                           (cfg.d_model,)) for i in range(cfg.num_layers)])}
