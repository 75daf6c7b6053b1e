"""Orbax checkpoints: round trips, dtype casts, sharded restore, and bad directories."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
from jaxinfer.errors import CheckpointError
from jaxinfer.sharding import ShardingRules, make_mesh
from jaxinfer.weights import weight_shardings, weight_specs

from .helpers import TINY, tiny_weights

# A failed Orbax restore (test_orbax_dir_missing_data) leaves callbacks aimed at its closed
# event loop; they surface as "Event loop is closed" during whichever test runs next.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def tiny_np():
    return jax.tree.map(np.asarray, tiny_weights())


@pytest.fixture
def saved(tmp_path, tiny_np):
    w = tiny_np
    save_checkpoint(tmp_path / "ck", TINY, w)
    return tmp_path / "ck", w


def test_round_trip(saved, tmp_path):
    path, w = saved
    assert is_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dir left behind
    cfg, got = load_checkpoint(path)
    assert cfg == TINY
    assert jax.tree.structure(got) == jax.tree.structure(w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(w), strict=True):
        assert isinstance(a, jax.Array) and a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), b)


def test_restore_casts_dtype(saved):
    path, w = saved
    _, got = load_checkpoint(path, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(got))
    np.testing.assert_array_equal(np.asarray(got["embed"]),
                                  w["embed"].astype(jnp.bfloat16))


def test_store_bfloat16(tmp_path, tiny_np):
    w = tiny_np
    save_checkpoint(tmp_path / "ck", TINY, w, dtype="bfloat16")
    _, got = load_checkpoint(tmp_path / "ck", dtype=jnp.float32)
    want = w["layers"]["wq"].astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(got["layers"]["wq"]), want)


def test_weights_are_stored_uncompressed_and_compressed_ones_load(tmp_path, tiny_np):
    """Orbax compresses with zstd unless told not to; restoring the default model then took
    0.7-0.9 s instead of 0.45 s (checkpoint.py). All-zero weights show which was written:
    compressed, they shrink to almost nothing. A checkpoint written compressed (by an
    earlier jaxinfer, or Orbax's defaults) still loads."""
    import orbax.checkpoint as ocp

    zeros = jax.tree.map(np.zeros_like, tiny_np)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(zeros))
    save_checkpoint(tmp_path / "ck", TINY, zeros)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "ck" / "weights").rglob("*")
                  if f.is_file())
    assert on_disk >= nbytes, (on_disk, nbytes)

    ones = jax.tree.map(np.ones_like, tiny_np)
    with ocp.PyTreeCheckpointer() as ckptr:  # Orbax's defaults: zstd
        ckptr.save(tmp_path / "ck" / "weights", args=ocp.args.PyTreeSave(ones), force=True)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "ck" / "weights").rglob("*")
                  if f.is_file())
    assert on_disk < nbytes / 4, (on_disk, nbytes)
    _, got = load_checkpoint(tmp_path / "ck")
    assert all(np.all(np.asarray(x) == 1) for x in jax.tree.leaves(got))


def test_sharded_restore_gives_each_device_its_shard(saved):
    path, w = saved
    mesh = make_mesh("data:4,model:2")
    sh = weight_shardings(weight_specs(TINY), mesh, ShardingRules.default(fsdp=True))
    _, got = load_checkpoint(path, shardings=sh)
    wq = got["layers"]["wq"]  # [L, D, N, H]: D over data (4), N over model (2)
    assert wq.sharding == sh["layers"]["wq"]
    shard = wq.addressable_shards[0].data
    assert shard.shape == (TINY.num_layers, TINY.d_model // 4, TINY.num_heads // 2,
                           TINY.head_dim)
    np.testing.assert_array_equal(np.asarray(wq), w["layers"]["wq"])


def test_tokenizer_is_copied(tmp_path, tiny_np):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    save_checkpoint(tmp_path / "ck", TINY, tiny_np, tok)
    assert (tmp_path / "ck" / "tokenizer" / "tokenizer.json").read_text() == "{}"
    with pytest.raises(CheckpointError, match="nonexistent"):
        save_checkpoint(tmp_path / "ck2", TINY, tiny_np, tmp_path / "nonexistent")
    assert not (tmp_path / "ck2").exists()


def test_save_refuses_bad_input(saved, tmp_path):
    path, w = saved
    with pytest.raises(CheckpointError, match="not empty"):
        save_checkpoint(path, TINY, w)
    with pytest.raises(CheckpointError, match="has shape"):
        save_checkpoint(tmp_path / "other", TINY.replace(num_heads=2, num_kv_heads=2), w)


def test_missing_and_foreign_dirs(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        load_checkpoint(tmp_path / "nope")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "junk.txt").write_text("not a checkpoint")
    assert not is_checkpoint(junk)
    with pytest.raises(CheckpointError, match="junk"):
        load_checkpoint(junk)
    TINY.save(junk / "config.json")  # config but weights/ is not Orbax
    (junk / "weights").mkdir()
    (junk / "weights" / "x.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="junk"):
        load_checkpoint(junk)


def test_config_mismatching_weights(saved):
    path, _ = saved
    TINY.replace(d_model=32, num_heads=2, num_kv_heads=1).save(path / "config.json")
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config"):
        load_checkpoint(path)


@pytest.mark.slow
def test_real_model_checkpoint(smollm2_checkpoint, smollm2_gguf):
    """The cached default checkpoint holds the GGUF's weights exactly, plus a tokenizer."""
    from jaxinfer.convert.gguf import load_gguf
    from jaxinfer.tokenizer import load_tokenizer

    assert is_checkpoint(smollm2_checkpoint)
    cfg, w = load_checkpoint(smollm2_checkpoint)
    cfg2, w2 = load_gguf(smollm2_gguf)
    assert cfg == cfg2
    for k in ("wq", "wk", "w_down"):
        np.testing.assert_array_equal(np.asarray(w["layers"][k]), w2["layers"][k])
    np.testing.assert_array_equal(np.asarray(w["embed"]), w2["embed"])
    tok = load_tokenizer(smollm2_checkpoint / "tokenizer")
    assert tok.vocab_size == cfg.vocab_size and 2 in tok.eos_ids


@pytest.mark.parametrize("remove", ["d", "manifest.ocdbt"])
def test_orbax_dir_missing_data(saved, remove):
    import shutil

    path, _ = saved
    target = path / "weights" / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_default_checkpoint_converts_once(tmp_path, monkeypatch, smollm2_gguf):
    """Racing callers (threads here, test workers in CI) convert the GGUF only once."""
    from concurrent.futures import ThreadPoolExecutor

    from jaxinfer import default_model

    monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path))
    monkeypatch.setenv("JAXINFER_SMOLLM2_GGUF", str(smollm2_gguf))
    calls, convert = [], default_model._convert
    monkeypatch.setattr(default_model, "_convert", lambda *a: (calls.append(a), convert(*a)))
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: default_model.checkpoint_path(), range(3)))
    assert paths == [tmp_path / "smollm2-135m-instruct"] * 3 and len(calls) == 1
    assert is_checkpoint(paths[0]) and (paths[0] / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "smollm2-135m-instruct"]


@pytest.mark.parametrize("mesh_a,mesh_b", [("data:2,model:4", "data:4,model:2"),
                                           ("model:8", "data:8")])
def test_save_under_one_mesh_restore_under_another(tmp_path, tiny_np, mesh_a, mesh_b):
    """Orbax stores global arrays, so the writing mesh does not constrain the reader."""
    sh_a = weight_shardings(weight_specs(TINY), make_mesh(mesh_a),
                            ShardingRules.default(fsdp=True))
    w_a = jax.tree.map(jax.device_put, tiny_np, sh_a)
    assert len(w_a["layers"]["w_gate"].sharding.device_set) == 8
    save_checkpoint(tmp_path / "ck", TINY, w_a)
    sh_b = weight_shardings(weight_specs(TINY), make_mesh(mesh_b), ShardingRules.default())
    _, w_b = load_checkpoint(tmp_path / "ck", shardings=sh_b)
    for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(tiny_np),
                               jax.tree.leaves(w_b), jax.tree.leaves(sh_b), strict=True):
        assert b.sharding == s, path
        np.testing.assert_array_equal(np.asarray(b), a, err_msg=str(path))


# Runs a script with writes past 20 kB failing with EFBIG, as on a full disk (SIGXFSZ,
# which would kill the process, is ignored so the write returns the error).
_SMALL_FILES = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, "
                "signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_failed_write_is_one_error_line_and_leaves_nothing(saved, tmp_path):
    """Orbax reports a failed write (full disk, file too large) as a ValueError from its
    async writer; the scripts print it as one `error:` line naming the checkpoint and the
    OS's reason, exit 2, and leave no partial directory (seen in CI on a full disk). The
    writer threads' own reports of it (absl error logs with tracebacks, asyncio callbacks
    finding Orbax's loop closed) are not printed as well."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path, _ = saved
    out = tmp_path / "q8"
    script = Path(__file__).resolve().parents[1] / "scripts" / "quantize.py"
    r = subprocess.run([sys.executable, "-c", _SMALL_FILES, str(script), "--checkpoint",
                        str(path), "--output", str(out), "--mode", "int8"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2, r.stderr
    assert last.startswith(f"error: cannot write checkpoint {out}") and "too large" in last
    assert "Traceback" not in r.stderr and "Unable to initialize backend" not in r.stderr, \
        r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_write_errors_maps_only_write_failures():
    from jaxinfer.checkpoint import write_errors

    with pytest.raises(CheckpointError, match=r"cannot write state in /w: Failed to write 8 "
                       r"bytes to file 3: No space left on device"):
        with write_errors("state in /w"):
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database '
                             'at local file "/w/x": Failed writing: "/w/x/d/1": Failed to '
                             'write 8 bytes to file 3: No space left on device')
    with pytest.raises(ValueError, match="a bug"):  # not a write: passes through
        with write_errors("state in /w"):
            raise ValueError("a bug")
