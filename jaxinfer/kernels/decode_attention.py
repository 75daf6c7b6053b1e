"""Ragged decode attention (one query per row) over a left-aligned KV cache, in Pallas.

    q_BNH      [B, N, H]     the new token's queries, N = K * G
    k_BKSH     [B, K, S, H]  one layer of the cache (v_BKSH alike), or with `layer`
                             the whole stacked cache [L, B, K, S, H]: the kernel then reads
                             layer `layer` in place, where slicing ck[i] inside the model's
                             scan would copy the layer before a custom call can read it
    lengths_B  i32[B]        valid slots per row (query position + 1); slots >= length are
                             never attended, and blocks wholly past it are skipped
    starts_B   i32[B]        optional first visible slot per row (a sliding window: length -
                             window); slots below it are masked and blocks wholly before it
                             skipped, so a local layer costs O(window), not O(length)
    softcap    float         optional: scores -> softcap * tanh(scores / softcap) (Gemma 2)
    sinks_N    f32[N]        optional: a logit per query head in every softmax's denominator
                             that attends to nothing (gpt-oss); the online softmax starts
                             from it (max = sink, sum = 1)
    returns    [B, N, H]

Flash decoding: S is cut into blocks of `block_s` and reduced with an online softmax, so a
row costs O(its length), not O(S). The G query heads sharing a KV head form one [G, H]
tile, so every K/V block is read once per KV head rather than once per query head.

One algorithm, two lowerings (`backend`):
  "tpu"  grid (B, K, S/block_s) with S the sequential ("arbitrary") axis and the running
         max / sum / accumulator in VMEM scratch. lengths and starts are scalar-prefetched:
         the K/V index_map clamps blocks outside a row's [start, length) to its first or last
         valid block, so the pipeline sees an unchanged block index and issues no DMA, and
         pl.when skips the math. This is the Mosaic TPU path (PrefetchScalarGridSpec).
  "gpu"  grid (B, K, num_splits) for the Triton lowering, which has no scalar prefetch and
         runs grid programs in parallel: each program loops (fori_loop, dynamic trip count)
         over the blocks of its S chunk that lie below the row's length, and the chunks'
         partial (out, max, sum) are merged in plain JAX (split-K flash decoding keeps the
         SMs busy when B * K is small). Triton wants power-of-2 tiles and dots with M >= 16,
         so G is zero-padded to >= 16 and H must be a power of 2.
Both run with interpret=True on CPU, which is how the tests cover them; the TPU path also
runs under the Mosaic TPU interpreter (interpret=pltpu.InterpretParams()). The GPU path was
checked compiled on an H100 with jax 0.11.2, which deprecates Pallas-Triton in favour of
Mosaic GPU (a port is the follow-up); the compiled TPU path is not yet verified.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from jaxinfer.layers import softcap as cap_scores

NEG_INF = -1e30  # finite, so a fully masked block gives exp(NEG_INF - m) = 0, never nan
BACKENDS = ("tpu", "gpu")
_BLOCK_CANDIDATES = {"tpu": (512, 256, 128, 64, 32, 16), "gpu": (128, 64, 32, 16)}
_GPU_TARGET_PROGRAMS = 256  # about two waves of an H100's 132 SMs


def ref_decode_attention(q_BNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                         lengths_B: jax.Array, starts_B: jax.Array | None = None,
                         softcap: float | None = None, sinks_N: jax.Array | None = None
                         ) -> jax.Array:
    """Pure-JAX twin: attention.ref_attention at T=1, q_position = length - 1 (window =
    length - start).

    Kept self-contained (kernels sit below attention.py in the import order). A row of
    length 0 attends to nothing and yields zeros, as the kernel does.
    """
    B, N, H = q_BNH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    q = q_BNH.reshape(B, K, N // K, H)
    scores = jnp.einsum("BKGH,BKSH->BKGS", q, k_BKSH,
                        preferred_element_type=jnp.float32) * (H ** -0.5)
    scores = cap_scores(scores, softcap)
    valid_BS = jnp.arange(S)[None, :] < lengths_B[:, None]
    if starts_B is not None:
        valid_BS &= jnp.arange(S)[None, :] >= starts_B[:, None]
    scores = jnp.where(valid_BS[:, None, None], scores, NEG_INF)
    if sinks_N is not None:  # one more score per head, whose value is zero
        sink = jnp.broadcast_to(sinks_N.astype(jnp.float32).reshape(1, K, N // K, 1),
                                (B, K, N // K, 1))
        scores = jnp.concatenate([scores, sink], axis=-1)
        v_BKSH = jnp.pad(v_BKSH, ((0, 0), (0, 0), (0, 1), (0, 0)))
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype)
    out = jnp.einsum("BKGS,BKSH->BKGH", probs, v_BKSH)
    out = jnp.where((lengths_B > 0)[:, None, None, None], out, 0)
    return out.reshape(B, N, H).astype(q_BNH.dtype)


def default_block_s(S: int, backend: str) -> int | None:
    """Largest candidate block that divides S (None if none does)."""
    return next((b for b in _BLOCK_CANDIDATES[backend] if S % b == 0), None)


def gpu_supports(H: int, S: int) -> bool:
    """Whether the Triton lowering takes this head dim and cache length."""
    return _is_pow2(H) and H >= 16 and default_block_s(S, "gpu") is not None


def default_num_splits(B: int, K: int, num_blocks: int) -> int:
    """GPU split-K factor: enough programs to fill the GPU, dividing the block count."""
    want = max(1, -(-_GPU_TARGET_PROGRAMS // (B * K)))
    return max(d for d in range(1, min(want, num_blocks) + 1) if num_blocks % d == 0)


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def validate_decode_attention_inputs(q_BNH, k_BKSH, v_BKSH, lengths_B, *, block_s: int | None,
                                     backend: str = "tpu", num_splits: int = 1,
                                     layer=None) -> None:
    """Static checks on shapes and dtypes only (safe under jit); raises ValueError."""

    def fail(msg: str):
        raise ValueError(f"decode_attention: {msg}")

    if backend not in BACKENDS:
        fail(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q_BNH.ndim != 3:
        fail(f"q_BNH must be [B, N, H], got shape {q_BNH.shape}")
    if layer is None and k_BKSH.ndim != 4:
        fail(f"k_BKSH must be [B, K, S, H], got shape {k_BKSH.shape}")
    if layer is not None and k_BKSH.ndim != 5:
        fail(f"with layer=, k must be the stacked [L, B, K, S, H], got shape {k_BKSH.shape}")
    if layer is not None and (jnp.ndim(layer) != 0
                              or not jnp.issubdtype(jnp.result_type(layer), jnp.integer)):
        fail(f"layer must be an integer scalar, got {layer!r}")
    if v_BKSH.shape != k_BKSH.shape:
        fail(f"v_BKSH shape {v_BKSH.shape} != k_BKSH shape {k_BKSH.shape}")
    B, N, H = q_BNH.shape
    Bk, K, S, Hk = k_BKSH.shape[-4:]
    if Bk != B:
        fail(f"batch mismatch: q_BNH has B={B}, k_BKSH has B={Bk}")
    if Hk != H:
        fail(f"head dim mismatch: q_BNH has H={H}, k_BKSH has H={Hk}")
    if N % K:
        fail(f"N={N} query heads must be a multiple of K={K} KV heads")
    if lengths_B.shape != (B,):
        fail(f"lengths_B must be [B]=({B},), got shape {lengths_B.shape}")
    if not jnp.issubdtype(lengths_B.dtype, jnp.integer):
        fail(f"lengths_B must be an integer array, got {lengths_B.dtype}")
    if not jnp.issubdtype(q_BNH.dtype, jnp.floating):
        fail(f"q_BNH must be floating point, got {q_BNH.dtype}")
    if not q_BNH.dtype == k_BKSH.dtype == v_BKSH.dtype:
        fail(f"q/k/v dtypes must match, got {q_BNH.dtype}/{k_BKSH.dtype}/{v_BKSH.dtype}")
    if block_s is None:
        fail(f"no block size in {_BLOCK_CANDIDATES[backend]} divides S={S}; pass block_s")
    if block_s <= 0 or S % block_s:
        fail(f"block_s={block_s} must be positive and divide S={S}")
    if backend == "tpu":
        sublanes = 8 * max(1, 4 // jnp.dtype(k_BKSH.dtype).itemsize)  # packed dtypes: more rows
        if block_s % sublanes and block_s != S:
            fail(f"block_s={block_s} must be a multiple of {sublanes} for {k_BKSH.dtype} on TPU")
    else:
        if not (_is_pow2(block_s) and block_s >= 16):
            fail(f"block_s={block_s} must be a power of 2 >= 16 for the Triton lowering")
        if not (_is_pow2(H) and H >= 16):
            fail(f"H={H} must be a power of 2 >= 16 for the Triton lowering")
        if num_splits < 1 or (S // block_s) % num_splits:
            fail(f"num_splits={num_splits} must divide the {S // block_s} blocks of S")


def _block_update(q_GH, k_sH, v_sH, start, lo, length, m_G1, l_G1, acc_GH, *, scale,
                  precision, softcap):
    """One online-softmax step over cache slots [start, start + block_s); slots outside
    the row's [lo, length) are masked."""
    dims_qk = (((1,), (1,)), ((), ()))
    s = lax.dot_general(q_GH, k_sH, dims_qk, precision=precision,
                        preferred_element_type=jnp.float32) * scale  # f32[G, block_s]
    s = cap_scores(s, softcap)
    slot = start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where((slot < length) & (slot >= lo), s, NEG_INF)
    m_new = jnp.maximum(m_G1, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_G1 - m_new)  # rescales what was accumulated under the old max
    p = jnp.exp(s - m_new)
    l_new = alpha * l_G1 + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v_sH.dtype), v_sH, (((1,), (0,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)
    return m_new, l_new, alpha * acc_GH + pv


# ---------------------------------------------------------------------------------------
# TPU (Mosaic): S is a sequential grid axis, lengths are scalar-prefetched.

def _tpu_kernel(lengths_ref, starts_ref, layer_ref, q_ref, k_ref, v_ref, sink_ref, o_ref,
                m_ref, l_ref, acc_ref, *, block_s, scale, precision, softcap):
    # lengths_ref, starts_ref: i32[B], layer_ref: i32[1] (SMEM, used by the index maps)
    # q_ref, o_ref: [G, H]   k_ref, v_ref: [block_s, H]   sink_ref: f32[G, 1] (NEG_INF: none)
    # m_ref, l_ref: f32[G, 1] running max / sum   acc_ref: f32[G, H] unnormalized output
    b, j = pl.program_id(0), pl.program_id(2)
    length, lo = lengths_ref[b], starts_ref[b]

    @pl.when(j == 0)
    def _init():  # a sink starts the softmax: its logit the max, exp(0) = 1 the sum
        sink = sink_ref[...]
        m_ref[...] = sink
        l_ref[...] = jnp.where(sink > NEG_INF, 1.0, 0.0).astype(jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j * block_s < length) & ((j + 1) * block_s > lo))
    def _step():
        m, l, acc = _block_update(q_ref[...], k_ref[...], v_ref[...], j * block_s, lo, length,
                                  m_ref[...], l_ref[...], acc_ref[...],
                                  scale=scale, precision=precision, softcap=softcap)
        m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def _decode_tpu(q_BKGH, k_LBKSH, v_LBKSH, lengths_B, starts_B, layer_1, sinks_KG1, *,
                block_s, scale, precision, softcap, interpret):
    B, K, G, H = q_BKGH.shape
    S = k_LBKSH.shape[3]

    def q_map(b, h, j, lengths_ref, starts_ref, layer_ref):
        return b, h, 0, 0

    def kv_map(b, h, j, lengths_ref, starts_ref, layer_ref):
        # Outside the row's blocks, keep pointing at its first / last valid block: no new
        # DMA is issued.
        last = jnp.maximum(lengths_ref[b] - 1, 0) // block_s
        first = jnp.minimum(starts_ref[b] // block_s, last)
        return layer_ref[0], b, h, jnp.clip(j, first, last), 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B, K, S // block_s),
        in_specs=[pl.BlockSpec((None, None, G, H), q_map),
                  pl.BlockSpec((None, None, None, block_s, H), kv_map),
                  pl.BlockSpec((None, None, None, block_s, H), kv_map),
                  pl.BlockSpec((None, G, 1), lambda b, h, j, *refs: (h, 0, 0))],
        out_specs=pl.BlockSpec((None, None, G, H), q_map),
        scratch_shapes=[pltpu.VMEM((G, 1), jnp.float32), pltpu.VMEM((G, 1), jnp.float32),
                        pltpu.VMEM((G, H), jnp.float32)])
    kernel = functools.partial(_tpu_kernel, block_s=block_s, scale=scale, precision=precision,
                               softcap=softcap)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q_BKGH.shape, q_BKGH.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="decode_attention_tpu",
    )(lengths_B, starts_B, layer_1, q_BKGH, k_LBKSH, v_LBKSH, sinks_KG1)


# ---------------------------------------------------------------------------------------
# GPU (Triton): parallel grid over S chunks, a dynamic-length loop inside each program.

def _gpu_kernel(len_ref, lo_ref, layer_ref, q_ref, k_ref, v_ref, o_ref, m_out_ref, l_out_ref,
                *, block_s, chunk, scale, precision, softcap):
    # len_ref, lo_ref: i32[] this row's length and first visible slot   layer_ref: i32[]
    # q_ref: [Gp, H]   k_ref, v_ref: [L, S, H] (pointers: only blocks in [lo, length) load)
    # o_ref: f32[Gp, H] chunk-normalized output
    # m_out_ref, l_out_ref: f32[Gp, 1] the chunk's max and sum, for the cross-chunk merge
    length, lo, layer = len_ref[()], lo_ref[()], layer_ref[()]
    start = pl.program_id(2) * chunk
    num_blocks = jnp.clip((length - start + block_s - 1) // block_s, 0, chunk // block_s)
    first = jnp.clip((lo - start) // block_s, 0, num_blocks)
    q = q_ref[...]
    Gp, H = q.shape

    def body(i, carry):
        off = pl.multiple_of(start + i * block_s, block_s)
        k = k_ref[layer, pl.ds(off, block_s), :]
        v = v_ref[layer, pl.ds(off, block_s), :]
        return _block_update(q, k, v, off, lo, length, *carry, scale=scale,
                             precision=precision, softcap=softcap)

    init = (jnp.full((Gp, 1), NEG_INF, jnp.float32), jnp.zeros((Gp, 1), jnp.float32),
            jnp.zeros((Gp, H), jnp.float32))
    m, l, acc = lax.fori_loop(first, num_blocks, body, init)
    o_ref[...] = acc / jnp.where(l > 0, l, 1.0)
    m_out_ref[...] = m
    l_out_ref[...] = l


def _decode_gpu(q_BKGH, k_LBKSH, v_LBKSH, lengths_B, starts_B, layer_1, sinks_KG1, *, block_s,
                num_splits, scale, precision, softcap, interpret):
    B, K, G, H = q_BKGH.shape
    L, S = k_LBKSH.shape[0], k_LBKSH.shape[3]
    Gp = max(16, pl.next_power_of_2(G))  # Triton dots need M >= 16, tiles a power of 2
    q_BKGH = jnp.pad(q_BKGH, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    kernel = functools.partial(_gpu_kernel, block_s=block_s, chunk=S // num_splits,
                               scale=scale, precision=precision, softcap=softcap)
    part = (None, None, None, Gp)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(B, K, num_splits),
        in_specs=[pl.BlockSpec((None,), lambda b, h, c: (b,)),
                  pl.BlockSpec((None,), lambda b, h, c: (b,)),
                  pl.BlockSpec((None,), lambda b, h, c: (0,)),
                  pl.BlockSpec((None, None, Gp, H), lambda b, h, c: (b, h, 0, 0)),
                  pl.BlockSpec((L, None, None, S, H), lambda b, h, c: (0, b, h, 0, 0)),
                  pl.BlockSpec((L, None, None, S, H), lambda b, h, c: (0, b, h, 0, 0))],
        out_specs=[pl.BlockSpec((*part, H), lambda b, h, c: (b, h, c, 0, 0)),
                   pl.BlockSpec((*part, 1), lambda b, h, c: (b, h, c, 0, 0)),
                   pl.BlockSpec((*part, 1), lambda b, h, c: (b, h, c, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, K, num_splits, Gp, H), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, num_splits, Gp, 1), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, num_splits, Gp, 1), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="decode_attention_gpu",
    )(lengths_B, starts_B, layer_1, q_BKGH, k_LBKSH, v_LBKSH)
    # Merge the chunks: weight each by its softmax mass under the global max; a sink is one
    # more part of mass exp(sink) and no value.
    sink = jnp.pad(sinks_KG1, ((0, 0), (0, Gp - G), (0, 0)), constant_values=NEG_INF)[None]
    top = jnp.maximum(jnp.max(m, axis=2), sink)  # f32[B, K, Gp, 1]
    w = l * jnp.exp(m - top[:, :, None])  # f32[B, K, splits, Gp, 1]
    total = jnp.sum(w, axis=2) + jnp.where(sink > NEG_INF, jnp.exp(sink - top), 0.0)
    out = jnp.sum(o * w, axis=2) / jnp.where(total > 0, total, 1.0)
    return out[:, :, :G].astype(q_BKGH.dtype)


def resolve_backend(backend: str | None, interpret: bool) -> str:
    """The lowering to use; on CPU only interpret mode exists, and it defaults to 'tpu'."""
    if backend is not None:
        return backend
    platform = jax.default_backend()
    if platform in BACKENDS:
        return platform
    if interpret:
        return "tpu"
    raise ValueError(f"decode_attention: Pallas has no {platform!r} lowering; "
                     "pass interpret=True (tests) or use the reference attention")


def decode_attention(q_BNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                     lengths_B: jax.Array, *, starts_B: jax.Array | None = None,
                     softcap: float | None = None, sinks_N: jax.Array | None = None,
                     layer: jax.Array | int | None = None,
                     block_s: int | None = None, backend: str | None = None,
                     num_splits: int | None = None,
                     interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """Ragged GQA decode attention, [B, N, H]; see the module docstring.

    starts_B: i32[B] first visible slot per row (sliding window); default 0.
    softcap: static soft cap of the scores (Gemma 2); default none.
    sinks_N: f32[N] attention sinks (gpt-oss); default none.
    layer: i32[] when k/v are the stacked [L, B, K, S, H] cache (read in place).
    block_s: cache slots per block (must divide S); default: largest candidate dividing S.
    backend: "tpu" | "gpu" lowering; default from jax.default_backend() ("tpu" in interpret).
    num_splits: GPU only, S chunks run in parallel; default fills the GPU.
    """
    backend = resolve_backend(backend, interpret)
    B, N, H = q_BNH.shape
    K, S = k_BKSH.shape[-3], k_BKSH.shape[-2]
    if block_s is None:
        block_s = default_block_s(S, backend)
    if backend == "gpu" and num_splits is None and block_s is not None and S % block_s == 0:
        num_splits = default_num_splits(B, K, S // block_s)
    validate_decode_attention_inputs(q_BNH, k_BKSH, v_BKSH, lengths_B, block_s=block_s,
                                     backend=backend, num_splits=num_splits or 1, layer=layer)
    if layer is None:  # a unit layer axis is a free reshape
        k_BKSH, v_BKSH, layer = k_BKSH[None], v_BKSH[None], 0
    layer_1 = jnp.clip(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), 0, k_BKSH.shape[0] - 1)
    # f32 inputs get exact f32 dots (Triton would otherwise use TF32); bf16 is native.
    precision = lax.Precision.HIGHEST if q_BNH.dtype == jnp.float32 else None
    if starts_B is not None and jnp.shape(starts_B) != (B,):
        raise ValueError(f"decode_attention: starts_B must be [B]=({B},), got shape "
                         f"{jnp.shape(starts_B)}")
    lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 0, S)  # a full cache attends to all S
    starts_B = (jnp.zeros_like(lengths_B) if starts_B is None
                else jnp.clip(starts_B.astype(jnp.int32), 0, S))
    q_BKGH = q_BNH.reshape(B, K, N // K, H)
    if sinks_N is not None and jnp.shape(sinks_N) != (N,):
        raise ValueError(f"decode_attention: sinks_N must be [N]=({N},), got shape "
                         f"{jnp.shape(sinks_N)}")
    sinks_KG1 = (jnp.full((K, N // K, 1), NEG_INF, jnp.float32) if sinks_N is None
                 else sinks_N.astype(jnp.float32).reshape(K, N // K, 1))
    kwargs = dict(block_s=block_s, scale=H ** -0.5, precision=precision, softcap=softcap,
                  interpret=interpret)
    with jax.named_scope("decode_attention"):
        if backend == "tpu":
            out = _decode_tpu(q_BKGH, k_BKSH, v_BKSH, lengths_B, starts_B, layer_1, sinks_KG1,
                              **kwargs)
        else:
            out = _decode_gpu(q_BKGH, k_BKSH, v_BKSH, lengths_B, starts_B, layer_1, sinks_KG1,
                              num_splits=num_splits, **kwargs)
    return out.reshape(B, N, H)
