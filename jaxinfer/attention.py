"""Grouped-query attention over the KV cache, and the dispatch to fused kernels.

    q_BTNH          [B, T, N, H]   queries at absolute positions q_positions_BT
    k_BKSH, v_BKSH  [B, K, S, H]   one layer of the left-aligned cache
    q_positions_BT  i32[B, T]
    returns         [B, T, N, H]

Queries are viewed as [B, T, K, G, H] so each KV head serves G query heads without
repeating K/V in memory. The mask is causal in absolute positions: a query at position p
sees cache slots s <= p, which also hides padding and stale slots (s > p). A sliding-window
layer (`window`, a traced i32 scalar, so local and global layers share one scanned body)
also hides s <= p - window, a chunked one (`chunked`, Llama 4) the slots before the start
of p's chunk of `window` positions; `softcap` (Gemma 2) caps the scores; `sinks_N`
(gpt-oss: one logit per query head) join each softmax's denominator as a slot that holds
no value. `ref_attention` is the source of truth; every other impl must match it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.kernels.decode_attention import (
    decode_attention,
    default_block_s,
    gpu_supports,
    resolve_backend,
)
from jaxinfer.layers import softcap as cap_scores

NEG_INF = -1e30
IMPLS = ("xla", "xla_chunked", "cudnn", "pallas", "pallas_interpret", "auto")  # see resolve_impl
CHUNK_S = 256  # xla_chunked: cache positions per step of its loop
CUDNN_MAX_HEAD_DIM = 256


def first_visible(pos: jax.Array, window: jax.Array, chunked: bool = False) -> jax.Array:
    """The first position a query at pos sees in a local layer: the last `window` positions
    (a sliding window), or the start of its chunk of `window` positions (chunked)."""
    return pos - pos % window if chunked else pos - window + 1


def visible(s: jax.Array, pos: jax.Array, window: jax.Array | None, chunked: bool = False
            ) -> jax.Array:
    """Whether cache slot s is visible to a query at position pos (broadcasting)."""
    seen = s <= pos
    return seen if window is None else seen & (s >= first_visible(pos, window, chunked))


def ref_attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                  q_positions_BT: jax.Array, window: jax.Array | None = None,
                  softcap: float | None = None, chunked: bool = False,
                  sinks_N: jax.Array | None = None) -> jax.Array:
    """Reference GQA attention; softmax in float32. Returns [B, T, N, H]."""
    B, T, N, H = q_BTNH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", q, k_BKSH,
                        preferred_element_type=jnp.float32) * (H ** -0.5)
    scores = cap_scores(scores, softcap)
    mask_BTS = visible(jnp.arange(S)[None, None, :], q_positions_BT[:, :, None], window,
                       chunked)
    scores = jnp.where(mask_BTS[:, None, None], scores, NEG_INF)
    if sinks_N is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype)
    else:  # a sink logit per head in the denominator only
        sink = sinks_N.astype(jnp.float32).reshape(K, N // K)[None, :, :, None, None]
        m = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
        p = jnp.exp(scores - m)
        probs = (p / (jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink - m))
                 ).astype(v_BKSH.dtype)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v_BKSH)
    return out.reshape(B, T, N, H)


def chunked_decode_attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                             q_positions_BT: jax.Array, layer: jax.Array | None = None,
                             chunk: int = CHUNK_S, window: jax.Array | None = None,
                             softcap: float | None = None, chunked: bool = False,
                             sinks_N: jax.Array | None = None) -> jax.Array:
    """Decode (T == 1) attention in XLA that reads only the cache chunks some row needs.

    `ref_attention` reads all S slots of the bucket; on CPU that costs up to 4.8x at
    batch 32 when S is much longer than the rows (docs/benchmarks.md). This loops over
    chunks of `chunk` slots up to the longest row, with an online softmax (float32 running
    max and sum), slicing each chunk straight out of the (stacked, if `layer`) cache. The
    same math as the reference up to float rounding; S must be a multiple of `chunk`. A
    local layer also skips the chunks before every row's first visible slot."""
    B, _, N, H = q_BTNH.shape
    K, S = k_BKSH.shape[-3], k_BKSH.shape[-2]
    G = N // K
    q_BKGH = (q_BTNH[:, 0].reshape(B, K, G, H) * (H ** -0.5)).astype(q_BTNH.dtype)
    pos_B = q_positions_BT[:, 0]
    stacked = layer is not None

    def read(c, start):  # [B, K, chunk, H] of layer `layer` (stacked) or of the array
        if stacked:
            return jax.lax.dynamic_slice(c, (layer, 0, 0, start, 0), (1, B, K, chunk, H))[0]
        return jax.lax.dynamic_slice(c, (0, 0, start, 0), (B, K, chunk, H))

    def body(i, carry):
        m_BKG, l_BKG, acc_BKGH = carry
        start = i * chunk
        s_BKGC = jnp.einsum("BKGH,BKCH->BKGC", q_BKGH, read(k_BKSH, start),
                            preferred_element_type=jnp.float32)
        s_BKGC = cap_scores(s_BKGC, softcap)
        mask_BC = visible((start + jnp.arange(chunk))[None], pos_B[:, None], window, chunked)
        s_BKGC = jnp.where(mask_BC[:, None, None], s_BKGC, NEG_INF)
        m_new = jnp.maximum(m_BKG, jnp.max(s_BKGC, -1))
        p_BKGC = jnp.exp(s_BKGC - m_new[..., None])
        corr = jnp.exp(m_BKG - m_new)
        v_BKCH = read(v_BKSH, start)
        pv = jnp.einsum("BKGC,BKCH->BKGH", p_BKGC.astype(v_BKCH.dtype), v_BKCH,
                        preferred_element_type=jnp.float32)
        return m_new, l_BKG * corr + jnp.sum(p_BKGC, -1), acc_BKGH * corr[..., None] + pv

    n_chunks = jnp.clip(jnp.max(pos_B) // chunk + 1, 1, S // chunk)
    first = 0 if window is None else jnp.clip(
        jnp.min(first_visible(pos_B, window, chunked)) // chunk, 0, n_chunks - 1)
    init = (jnp.full((B, K, G), NEG_INF, jnp.float32), jnp.zeros((B, K, G), jnp.float32),
            jnp.zeros((B, K, G, H), jnp.float32))
    if sinks_N is not None:  # the sink starts the running softmax: max = sink, sum = 1
        sink_BKG = jnp.broadcast_to(sinks_N.astype(jnp.float32).reshape(K, G), (B, K, G))
        init = (sink_BKG, jnp.ones((B, K, G), jnp.float32), init[2])
    _, l_BKG, acc_BKGH = jax.lax.fori_loop(first, n_chunks, body, init)
    out = acc_BKGH / l_BKG[..., None]
    return out.reshape(B, 1, N, H).astype(v_BKSH.dtype)


def cudnn_attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                    q_positions_BT: jax.Array, implementation: str = "cudnn") -> jax.Array:
    """cuDNN flash attention through jax.nn.dot_product_attention.

    cuDNN's causal mask is aligned top-left (query t sees keys <= t), which is wrong once
    the cache holds a prefix, so prefill passes the absolute-position mask explicitly (cuDNN
    takes it as a [B, 1, T, S] bias). Decode (T == 1) needs no mask: its causal mask is just
    "the first position + 1 slots", i.e. key_value_seq_lengths, which lets cuDNN skip the
    rest. implementation="xla" runs the same arguments through XLA, so CPU tests check them.
    jax.nn wants K/V as [B, S, K, H]: the cache layout [B, K, S, H] costs a transpose here.
    """
    if implementation == "cudnn" and q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"impl='cudnn' needs bf16/fp16 inputs, got {q_BTNH.dtype}; "
                         "use impl='auto' to fall back to 'xla' for other dtypes")
    B, T, N, H = q_BTNH.shape
    S = k_BKSH.shape[2]
    k_BSKH, v_BSKH = jnp.swapaxes(k_BKSH, 1, 2), jnp.swapaxes(v_BKSH, 1, 2)
    if T == 1:
        kv_len_B = jnp.clip(q_positions_BT[:, 0] + 1, 1, S).astype(jnp.int32)
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, query_seq_lengths=jnp.ones((B,), jnp.int32),
            key_value_seq_lengths=kv_len_B, implementation=implementation)
    mask_B1TS = (jnp.arange(S)[None, None, :] <= q_positions_BT[:, :, None])[:, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS,
                                        implementation=implementation)


def pallas_attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                     q_positions_BT: jax.Array, interpret: bool = False,
                     layer: jax.Array | None = None, window: jax.Array | None = None,
                     softcap: float | None = None, chunked: bool = False,
                     sinks_N: jax.Array | None = None) -> jax.Array:
    """The Pallas decode kernel for T == 1 (a window or chunk becomes each row's first
    visible slot, so the kernel skips the blocks before it; sinks start its softmax);
    prefill (or an S no block divides) uses the ref."""
    backend = resolve_backend(None, interpret)
    block_s = default_block_s(k_BKSH.shape[-2], backend)
    if q_BTNH.shape[1] != 1 or block_s is None:
        k_BKSH, v_BKSH = (k_BKSH, v_BKSH) if layer is None else (k_BKSH[layer], v_BKSH[layer])
        return ref_attention(q_BTNH, k_BKSH, v_BKSH, q_positions_BT, window, softcap, chunked,
                             sinks_N)
    lengths_B = q_positions_BT[:, 0] + 1
    starts_B = None if window is None else jnp.maximum(
        first_visible(q_positions_BT[:, 0], window, chunked), 0)
    out_BNH = decode_attention(q_BTNH[:, 0], k_BKSH, v_BKSH, lengths_B, starts_B=starts_B,
                               softcap=softcap, sinks_N=sinks_N, layer=layer, block_s=block_s,
                               backend=backend, interpret=interpret)
    return out_BNH[:, None]


def default_impl() -> str:
    """The attention impl models get when none is named: 'auto' on CPU (the chunked XLA
    decode loop: up to 6x faster at long cache buckets, docs/benchmarks.md), the XLA
    reference on accelerators, where 'auto' (Pallas, cuDNN) is opt-in because the TPU
    kernel has run only in interpret mode here."""
    return "auto" if jax.default_backend() == "cpu" else "xla"


def resolve_impl(impl: str, q_BTNH, k_BKSH) -> str:
    """'auto': Pallas on TPU; on GPU for bf16/fp16, the Pallas kernel for decode and cuDNN
    for prefill; elsewhere (CPU) the chunked XLA decode loop when the cache is longer than
    one chunk, and the XLA reference otherwise.

    On an H100 the Pallas decode kernel beat cuDNN at T == 1 for every shape measured
    (cuDNN via jax.nn also pays a transpose of the [B, K, S, H] cache); cuDNN's flash
    attention is the one that avoids materializing [T, S] scores in prefill.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    chunkable = q_BTNH.shape[1] == 1 and k_BKSH.shape[-2] % CHUNK_S == 0  # decode, whole chunks
    if impl == "xla_chunked" and not chunkable:
        return "xla"  # prefill, or a cache no chunk divides: the reference
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    if platform == "tpu":
        return "pallas"
    if platform == "gpu" and q_BTNH.dtype in (jnp.bfloat16, jnp.float16):
        decode = q_BTNH.shape[1] == 1 and gpu_supports(q_BTNH.shape[-1], k_BKSH.shape[-2])
        if decode:
            return "pallas"
        # cuDNN's flash attention takes heads up to 256 wide; latent attention's 576-wide
        # [latent, RoPE key] rows (DeepSeek) go through the reference
        return "cudnn" if q_BTNH.shape[-1] <= CUDNN_MAX_HEAD_DIM else "xla"
    if chunkable and k_BKSH.shape[-2] > CHUNK_S:  # one chunk: nothing to skip
        return "xla_chunked"
    return "xla"


def attention(q_BTNH, k_BKSH, v_BKSH, q_positions_BT, impl: str = "xla",
              layer: jax.Array | None = None, window: jax.Array | None = None,
              softcap: float | None = None, chunked: bool = False,
              sinks_N: jax.Array | None = None) -> jax.Array:
    """Dispatch on impl (see IMPLS and resolve_impl); 'xla' is the reference.

    layer (i32[], optional): k/v are then the stacked cache [L, B, K, S, H]. The Pallas
    kernel reads that layer in place; slicing ck[i] first, inside the layer scan, makes XLA
    copy the whole layer before any custom call (Pallas or cuDNN) can read it.
    window / softcap (Gemma), chunked (Llama 4): every impl but cuDNN takes them; cuDNN
    falls back to the reference. sinks_N (gpt-oss): every impl but cuDNN takes them.
    """
    impl = resolve_impl(impl, q_BTNH, k_BKSH)
    if impl == "cudnn" and (window is not None or softcap is not None):
        impl = "xla"
    if sinks_N is not None and impl == "cudnn":
        impl = "xla"
    if impl in ("pallas", "pallas_interpret"):
        return pallas_attention(q_BTNH, k_BKSH, v_BKSH, q_positions_BT,
                                interpret=impl == "pallas_interpret", layer=layer,
                                window=window, softcap=softcap, chunked=chunked,
                                sinks_N=sinks_N)
    if impl == "xla_chunked":
        return chunked_decode_attention(q_BTNH, k_BKSH, v_BKSH, q_positions_BT, layer=layer,
                                        window=window, softcap=softcap, chunked=chunked,
                                        sinks_N=sinks_N)
    if layer is not None:
        k_BKSH, v_BKSH = k_BKSH[layer], v_BKSH[layer]
    if impl == "cudnn":
        return cudnn_attention(q_BTNH, k_BKSH, v_BKSH, q_positions_BT)
    return ref_attention(q_BTNH, k_BKSH, v_BKSH, q_positions_BT, window, softcap, chunked,
                         sinks_N)
