"""Kernels against their pure-JAX twins (Pallas interpret mode on CPU), the attention
dispatch, and, when an accelerator is present, the compiled kernels and cuDNN."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxinfer import kv_cache, model
from jaxinfer.attention import attention, cudnn_attention, ref_attention, resolve_impl
from jaxinfer.kernels import (
    decode_attention,
    ref_decode_attention,
    validate_decode_attention_inputs,
)

from .helpers import TINY, tiny_weights

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")
on_tpu = pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU backend")


@pytest.fixture(autouse=True)
def _exact_f32_matmuls():
    """References in true f32: on GPU the default f32 matmul is TF32 (~1e-3 off)."""
    with jax.default_matmul_precision("highest"):
        yield


def _inputs(B=4, K=2, G=3, S=256, H=16, dtype=jnp.float32, seed=0):
    """Random q [B, N, H], k/v [B, K, S, H]; ragged lengths incl. 1 and S."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, K * G, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, K, S, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, K, S, H), jnp.float32).astype(dtype)
    lengths = jnp.asarray([1, S, S // 2 - 3, S // 2 + 1][:B], jnp.int32)
    return q, k, v, lengths


# ---------------------------------------------------------------------------------------
# The kernel in interpret mode

@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("block_s", [16, 64, 256])
def test_decode_kernel_matches_ref_f32(backend, G, block_s):
    q, k, v, lengths = _inputs(G=G)
    out = decode_attention(q, k, v, lengths, block_s=block_s, backend=backend, interpret=True)
    ref = ref_decode_attention(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    # ...and the twin is ref_attention at T = 1, position = length - 1.
    full = ref_attention(q[:, None], k, v, (lengths - 1)[:, None])[:, 0]
    np.testing.assert_allclose(np.asarray(ref), np.asarray(full), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_decode_kernel_bf16(backend):
    q, k, v, lengths = _inputs(B=3, G=3, S=128, H=32, dtype=jnp.bfloat16, seed=1)
    out = decode_attention(q, k, v, lengths, block_s=32, backend=backend, interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = ref_decode_attention(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=2e-2, rtol=0)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_decode_kernel_window_and_softcap(backend, softcap):
    """Gemma's sliding windows (a first visible slot per row, blocks before it skipped;
    windows inside one block, across blocks, longer than the row) and soft-capped scores,
    against the twin, and the twin against ref_attention's window mask."""
    q, k, v, lengths = _inputs(B=4, G=2, S=256)
    window = jnp.int32(40)
    starts = jnp.maximum(lengths - window, 0)
    out = decode_attention(q, k, v, lengths, starts_B=starts, softcap=softcap, block_s=16,
                           backend=backend, num_splits=4 if backend == "gpu" else None,
                           interpret=True)
    ref = ref_decode_attention(q, k, v, lengths, starts, softcap)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    full = ref_attention(q[:, None], k, v, (lengths - 1)[:, None], window, softcap)[:, 0]
    np.testing.assert_allclose(np.asarray(ref), np.asarray(full), atol=1e-6, rtol=0)
    assert np.abs(np.asarray(ref - ref_decode_attention(q, k, v, lengths))).max() > 1e-2


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_decode_kernel_sinks(backend):
    """gpt-oss's attention sinks (a logit per query head, no value) with a window and
    ragged rows (a length-0 row stays zero), against the twin, and the twin against
    ref_attention's sinks; sinks large enough to soak up most of the attention."""
    q, k, v, lengths = _inputs(B=4, G=2, S=128)
    lengths = lengths.at[0].set(0)
    sinks = 3.0 * jax.random.normal(jax.random.key(7), (4,))
    starts = jnp.maximum(lengths - 40, 0)
    out = decode_attention(q, k, v, lengths, starts_B=starts, sinks_N=sinks, block_s=16,
                           backend=backend, num_splits=4 if backend == "gpu" else None,
                           interpret=True)
    ref = ref_decode_attention(q, k, v, lengths, starts, sinks_N=sinks)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    assert not np.asarray(out[0]).any()
    full = ref_attention(q[1:, None], k[1:], v[1:], (lengths[1:] - 1)[:, None], jnp.int32(40),
                         sinks_N=sinks)[:, 0]
    np.testing.assert_allclose(np.asarray(ref[1:]), np.asarray(full), atol=1e-6, rtol=0)
    plain = ref_decode_attention(q, k, v, lengths, starts)
    assert np.abs(np.asarray(ref - plain)).max() > 1e-2
    got = attention(q[:, None], k, v, (lengths - 1)[:, None], "pallas_interpret",
                    window=jnp.int32(40), sinks_N=sinks)[:, 0]
    np.testing.assert_allclose(np.asarray(got[1:]), np.asarray(full), atol=1e-5, rtol=0)


@pytest.mark.parametrize("T", [1, 3])
def test_attention_window_through_every_impl(T):
    """The dispatch passes a layer's traced window and the soft cap to each impl that
    takes them (cuDNN, which takes neither, falls back to the reference)."""
    q, k, v, lengths = _inputs(B=2, G=2, S=512)
    q = jnp.repeat(q[:, None], T, axis=1)
    pos = (lengths - 1)[:, None] - jnp.arange(T)[None, ::-1]
    k2, v2 = jnp.stack([k * 0, k]), jnp.stack([v * 0, v])
    want = ref_attention(q, k, v, pos, jnp.int32(300), 2.0)
    for impl in ("xla", "xla_chunked", "pallas_interpret"):
        got = jax.jit(lambda w, impl=impl: attention(q, k2, v2, pos, impl, layer=jnp.int32(1),
                                                     window=w, softcap=2.0))(jnp.int32(300))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=0,
                                   err_msg=impl)
    with mock.patch("jaxinfer.attention.resolve_impl", return_value="cudnn"):
        got = attention(q, k, v, pos, "cudnn", window=jnp.int32(300), softcap=2.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=0)


def test_gpu_split_k_and_edge_lengths():
    """Several S chunks per row (incl. empty ones), length 0 -> zeros, length > S -> all S."""
    q, k, v, _ = _inputs(B=4, G=2, S=128)
    lengths = jnp.asarray([0, 200, 33, 96], jnp.int32)
    out = decode_attention(q, k, v, lengths, block_s=16, backend="gpu", num_splits=4,
                           interpret=True)
    ref = ref_decode_attention(q, k, v, jnp.minimum(lengths, 128))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    assert not np.asarray(out[0]).any()


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_decode_kernel_reads_a_layer_of_the_stacked_cache(backend):
    q, k, v, lengths = _inputs(B=2, G=2, S=64)
    k_L, v_L = jnp.stack([k, -k, 2 * k]), jnp.stack([v, v + 1, -v])  # [L, B, K, S, H]
    fn = jax.jit(lambda layer: decode_attention(q, k_L, v_L, lengths, layer=layer, block_s=16,
                                                backend=backend, interpret=True))
    for layer in (1, 2):
        ref = ref_decode_attention(q, k_L[layer], v_L[layer], lengths)
        np.testing.assert_allclose(np.asarray(fn(layer)), np.asarray(ref), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="stacked"):
        decode_attention(q, k, v, lengths, layer=0, interpret=True)


def test_tpu_kernel_under_mosaic_interpreter():
    """The TPU-faithful interpreter (DMA, SMEM/VMEM semantics), beyond the generic one."""
    q, k, v, lengths = _inputs(B=2, G=2, S=64, H=128)
    out = decode_attention(q, k, v, lengths, block_s=16, backend="tpu",
                           interpret=pltpu.InterpretParams())
    ref = ref_decode_attention(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    starts = jnp.maximum(lengths - 20, 0)  # a sliding window: blocks before it not fetched
    out = decode_attention(q, k, v, lengths, starts_B=starts, softcap=3.0, block_s=16,
                           backend="tpu", interpret=pltpu.InterpretParams())
    ref = ref_decode_attention(q, k, v, lengths, starts, 3.0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    sinks = jnp.asarray([2.0, -1.0, 0.5, 3.0])  # gpt-oss's sinks, read as a [G, 1] block
    out = decode_attention(q, k, v, lengths, starts_B=starts, sinks_N=sinks, block_s=16,
                           backend="tpu", interpret=pltpu.InterpretParams())
    ref = ref_decode_attention(q, k, v, lengths, starts, sinks_N=sinks)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, message", [
    (dict(q=(4, 6)), "q_BNH must be"),
    (dict(k=(4, 2, 256)), "k_BKSH must be"),
    (dict(v=(4, 2, 128, 16)), "v_BKSH shape"),
    (dict(q=(3, 6, 16)), "batch mismatch"),
    (dict(q=(4, 6, 8)), "head dim mismatch"),
    (dict(q=(4, 5, 16)), "multiple of K=2"),
    (dict(lengths=(4, 1)), "lengths_B must be"),
    (dict(block_s=48), "must be positive and divide S=256"),
    (dict(block_s=4), "multiple of 8"),
    (dict(block_s=None), "no block size"),
    (dict(backend="gpu", block_s=8), "power of 2 >= 16"),
    (dict(backend="gpu", H=24, block_s=16), "H=24 must be a power of 2"),
    (dict(backend="gpu", block_s=64, num_splits=3), "num_splits=3 must divide"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_validator_rejects(change, message):
    H = change.pop("H", 16)
    sd = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
    q = sd(change.pop("q", (4, 6, H)))
    k = sd(change.pop("k", (4, 2, 256, H)))
    v = sd(change.pop("v", k.shape))
    lengths = sd(change.pop("lengths", (4,)), jnp.int32)
    kwargs = dict(block_s=64, backend="tpu", num_splits=1) | change
    with pytest.raises(ValueError, match=message):
        validate_decode_attention_inputs(q, k, v, lengths, **kwargs)


def test_validator_rejects_dtypes():
    q, k, v, lengths = _inputs()
    with pytest.raises(ValueError, match="dtypes must match"):
        validate_decode_attention_inputs(q.astype(jnp.bfloat16), k, v, lengths, block_s=64)
    with pytest.raises(ValueError, match="integer array"):
        validate_decode_attention_inputs(q, k, v, lengths.astype(jnp.float32), block_s=64)
    with pytest.raises(ValueError, match="divide S=256"):
        decode_attention(q, k, v, lengths, block_s=96, interpret=True)


# ---------------------------------------------------------------------------------------
# Dispatch

def test_attention_pallas_interpret_equals_xla_decode():
    q, k, v, lengths = _inputs(B=3, G=2, S=128)
    q_BTNH, pos_BT = q[:, None], (lengths - 1)[:, None]
    a = attention(q_BTNH, k, v, pos_BT, impl="pallas_interpret")
    b = attention(q_BTNH, k, v, pos_BT, impl="xla")
    assert a.shape == b.shape == q_BTNH.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("T", [1, 5])
def test_attention_with_stacked_cache_and_layer(impl, T):
    q, k, v, pos = _prefill_inputs()
    q, pos = q[:, :T], pos[:, :T]
    k_L, v_L = jnp.stack([-k, k]), jnp.stack([v * 3, v])
    out = attention(q, k_L, v_L, pos, impl, layer=jnp.int32(1))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_attention(q, k, v, pos)),
                               atol=1e-5, rtol=0)


def _prefill_inputs(dtype=jnp.float32):
    """T = 5 new tokens after prefixes of 0, 10 and 59 tokens (a 64-slot cache)."""
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    B, T, K, G, S, H = 3, 5, 2, 3, 64, 16
    q = jax.random.normal(kq, (B, T, K * G, H)).astype(dtype)
    k = jax.random.normal(kk, (B, K, S, H)).astype(dtype)
    v = jax.random.normal(kv, (B, K, S, H)).astype(dtype)
    pos = jnp.asarray([0, 10, 59], jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)
    return q, k, v, pos


def test_attention_pallas_prefill_falls_back_to_ref():
    q, k, v, pos = _prefill_inputs()
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, pos, "pallas_interpret")),
                                  np.asarray(ref_attention(q, k, v, pos)))


@pytest.mark.parametrize("T", [1, 5])
def test_cudnn_arguments_match_ref_via_xla(T):
    """The exact masks / seq lengths handed to cuDNN, run through XLA's implementation."""
    q, k, v, pos = _prefill_inputs()
    q, pos = q[:, :T], pos[:, :T]
    out = cudnn_attention(q, k, v, pos, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_attention(q, k, v, pos)),
                               atol=1e-5, rtol=0)


def test_cudnn_path_traces_on_cpu():
    """Shape-check the real cuDNN call by tracing it with the hardware probes stubbed."""
    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    probes = ("check_cudnn_version", "check_compute_capability",
              "is_cuda_compute_capability_equal")
    if not all(hasattr(fa, p) for p in probes):
        pytest.skip("jax's cuDNN internals changed; the GPU test covers this path")
    q, k, v, pos = _prefill_inputs(jnp.bfloat16)
    with (mock.patch.object(fa, probes[0], return_value=91000),
          mock.patch.object(fa, probes[1], return_value=True),
          mock.patch.object(fa, probes[2], return_value=False)):
        for T in (1, 5):
            out = jax.eval_shape(cudnn_attention, q[:, :T], k, v, pos[:, :T])
            assert out.shape == q[:, :T].shape and out.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="bf16/fp16"):
        cudnn_attention(q.astype(jnp.float32), k, v, pos)


def test_resolve_impl():
    sd = jax.ShapeDtypeStruct
    k = sd((2, 2, 256, 64), jnp.bfloat16)
    decode, prefill = sd((2, 1, 4, 64), jnp.bfloat16), sd((2, 8, 4, 64), jnp.bfloat16)
    assert resolve_impl("xla", decode, k) == "xla"
    platform = jax.default_backend()
    expected = {"gpu": ("pallas", "cudnn"), "tpu": ("pallas", "pallas")}.get(platform,
                                                                           ("xla", "xla"))
    assert (resolve_impl("auto", decode, k), resolve_impl("auto", prefill, k)) == expected
    f32 = sd((2, 1, 4, 64), jnp.float32)
    assert resolve_impl("auto", f32, k) == ("pallas" if platform == "tpu" else "xla")
    with pytest.raises(ValueError, match="unknown attention impl"):
        resolve_impl("flash", decode, k)
    # On a GPU, latent attention's 576-wide heads (no Triton block, past cuDNN's 256) take
    # the reference for decode and prefill alike.
    with mock.patch("jax.default_backend", return_value="gpu"):
        for T in (1, 8):
            q = sd((2, T, 16, 576), jnp.bfloat16)
            assert resolve_impl("auto", q, sd((2, 1, 256, 576), jnp.bfloat16)) == "xla"
        assert resolve_impl("auto", prefill, k) == "cudnn"


# ---------------------------------------------------------------------------------------
# End to end on the tiny model

def _tiny_decode_logits(impl, steps=3, dtype=jnp.float32):
    """Ragged prefill (lengths 5, 17, 1) then `steps` decode steps; logits of each step."""
    w = tiny_weights(dtype=dtype)
    rng = np.random.RandomState(4)
    lens = np.array([5, 17, 1], np.int32)
    toks = rng.randint(0, TINY.vocab_size, (3, 32)).astype(np.int32)
    padded = np.where(np.arange(32)[None, :] < lens[:, None], toks, 0)[:, :24]
    cache = kv_cache.init_cache(TINY, 3, 64, dtype)  # S = 64: one 64-slot block on the TPU path
    _, cache = model.prefill(w, jnp.asarray(padded), jnp.asarray(lens), cache, TINY, impl=impl)
    out = []
    for t in range(steps):
        nxt = jnp.asarray(toks[np.arange(3), lens + t])
        logits, cache = model.decode_step(w, nxt, cache, TINY, impl=impl)
        out.append(np.asarray(logits))
    return np.stack(out)


@pytest.mark.slow
def test_tiny_model_decode_pallas_interpret_equals_xla():
    np.testing.assert_allclose(_tiny_decode_logits("pallas_interpret"),
                               _tiny_decode_logits("xla"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("S,stacked", [(512, False), (1024, True), (256, True)])
def test_xla_chunked_decode_equals_reference(S, stacked):
    """Ragged rows (1, S, S/2 - 3, S/2 + 1 positions): the chunked loop reads only the
    chunks the longest row needs and matches the reference over the whole bucket."""
    q, k, v, lengths = _inputs(S=S)
    pos_BT = (lengths - 1)[:, None]
    want = ref_attention(q[:, None], k, v, pos_BT)
    if stacked:  # the model's layout: the stacked cache [L, B, K, S, H], layer 1
        k2, v2 = jnp.stack([k * 0, k]), jnp.stack([v * 0, v])
        got = attention(q[:, None], k2, v2, pos_BT, "xla_chunked", layer=jnp.int32(1))
    else:
        got = attention(q[:, None], k, v, pos_BT, "xla_chunked")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=0)
    # Rows no longer than one chunk: the loop stops after it and still matches.
    short = jnp.minimum(pos_BT, 100)
    np.testing.assert_allclose(np.asarray(attention(q[:, None], k, v, short, "xla_chunked")),
                               np.asarray(ref_attention(q[:, None], k, v, short)), atol=2e-6)


def test_auto_on_cpu_chunks_long_decode_caches_only():
    from jaxinfer.attention import default_impl

    assert default_impl() == ("auto" if jax.default_backend() == "cpu" else "xla")
    q1, q8 = jnp.zeros((1, 1, 6, 16)), jnp.zeros((1, 8, 6, 16))
    cache = lambda S: jnp.zeros((1, 2, S, 16))
    assert resolve_impl("auto", q1, cache(1024)) == "xla_chunked"
    assert resolve_impl("auto", q1, cache(256)) == "xla"  # one chunk: nothing to skip
    assert resolve_impl("auto", q8, cache(1024)) == "xla"  # prefill
    assert resolve_impl("xla_chunked", q1, cache(96)) == "xla"  # no chunk divides 96


@pytest.mark.slow
def test_tiny_model_decode_xla_chunked_equals_xla():
    """Through the model (scan over the stacked cache), S = 512 so two chunks exist."""
    def logits(impl):
        w = tiny_weights()
        toks = jnp.asarray(np.random.RandomState(5).randint(0, TINY.vocab_size, (2, 300)))
        cache = kv_cache.init_cache(TINY, 2, 512)
        _, cache = model.prefill(w, toks, jnp.asarray([300, 40]), cache, TINY, impl=impl)
        out, nxt = [], jnp.asarray([7, 9])
        for _ in range(3):
            lg, cache = model.decode_step(w, nxt, cache, TINY, impl=impl)
            out.append(np.asarray(lg))
        return np.stack(out)
    np.testing.assert_allclose(logits("xla_chunked"), logits("xla"), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# Real hardware (run with JAX_PLATFORMS unset or set to the accelerator)

@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_gpu_compiled_kernel(dtype, atol):
    q, k, v, lengths = _inputs(B=4, K=2, G=4, S=1024, H=64, dtype=dtype)
    out = jax.jit(decode_attention)(q, k, v, lengths)
    ref = ref_decode_attention(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=atol, rtol=0)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("T", [1, 5])
def test_gpu_cudnn_matches_ref(T):
    q, k, v, pos = _prefill_inputs(jnp.bfloat16)
    q, pos = q[:, :T], pos[:, :T]
    out = jax.jit(cudnn_attention)(q, k, v, pos)
    ref = ref_attention(q, k, v, pos)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=2e-2, rtol=0)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("impl, dtype, tol", [("pallas", jnp.float32, 1e-5),
                                             ("pallas", jnp.bfloat16, 3e-2),
                                             ("cudnn", jnp.bfloat16, 3e-2),
                                             ("auto", jnp.bfloat16, 3e-2)])
def test_gpu_tiny_model_decode(impl, dtype, tol):
    """bf16 runs differ from XLA's by rounding only: compare relative to the logits' norm."""
    got = _tiny_decode_logits(impl, dtype=dtype)
    want = _tiny_decode_logits("xla", dtype=dtype)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"{impl} {jnp.dtype(dtype).name}: relative logits error {err:.2e}")
    assert err < tol


@pytest.mark.tpu
@on_tpu
@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_tpu_compiled_kernel(dtype, atol):
    q, k, v, lengths = _inputs(B=4, K=2, G=4, S=1024, H=128, dtype=dtype)
    out = jax.jit(decode_attention)(q, k, v, lengths)
    ref = ref_decode_attention(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=atol, rtol=0)
