"""Distillation: the KL to the teacher falls; an interrupted run resumes to the same
weights; the step runs sharded; the student is an ordinary checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import distill, prune
from jaxinfer.errors import ConfigError
from jaxinfer.sharding import make_mesh
from jaxinfer.weights import weight_shardings, weight_specs

from .helpers import TINY, tiny_weights

ROOT = Path(__file__).resolve().parents[1]
IDS = np.random.default_rng(0).integers(0, TINY.vocab_size, 4000).astype(np.int32)
DC = distill.DistillConfig(steps=8, batch_size=4, seq_len=32, learning_rate=3e-3,
                           warmup_steps=2, temperature=2.0, hard_weight=0.1, save_every=4)


def _student():
    teacher = tiny_weights(TINY, 0)
    imp = prune.calibrate(teacher, prune.windows(IDS, 32, 4, 2), TINY)
    scfg, student = prune.prune_weights(teacher, TINY, prune.evenly_spaced_layers(3, 2),
                                        prune.channels_to_keep(imp.channel_LF, 48))
    return teacher, scfg, student


def _heldout_kl(student, scfg, teacher):
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, TINY.vocab_size, (8, 33)))
    s = distill.logits(student, tokens[:, :-1], scfg)
    t = distill.logits(teacher, tokens[:, :-1], TINY)
    return float(distill.kd_loss(s, t, tokens[:, 1:], 1.0, 0.0)[1]["kl"])


@pytest.mark.slow
def test_kl_falls(tmp_path):
    teacher, scfg, student = _student()
    assert (scfg.num_layers, scfg.mlp_dim) == (2, 48)
    before = _heldout_kl(student, scfg, teacher)
    dc = distill.DistillConfig(**{**DC.__dict__, "steps": 40, "save_every": 40})
    params, history = distill.train(student, scfg, teacher, TINY, IDS, dc, tmp_path,
                                    progress=False)
    after = _heldout_kl(params, scfg, teacher)
    assert len(history) == 40 and after < 0.6 * before, (before, after)
    first = np.mean([h["kl"] for h in history[:5]])
    last = np.mean([h["kl"] for h in history[-5:]])
    assert last < 0.8 * first, (first, last)


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    teacher, scfg, student = _student()
    full, hist = distill.train(student, scfg, teacher, TINY, IDS, DC, tmp_path / "a",
                               progress=False)
    # "Crash" after step 4: drop the step-8 checkpoint, rerun the same command.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "state" / "8")
    calls = []
    real = distill.batch_at
    monkeypatch.setattr(distill, "batch_at", lambda ids, step, dc: calls.append(step) or
                        real(ids, step, dc))
    resumed, hist2 = distill.train(student, scfg, teacher, TINY, IDS, DC, tmp_path / "b",
                                   progress=False)
    assert calls == [4, 5, 6, 7]  # only the lost steps ran again
    assert [h["step"] for h in hist2] == list(range(1, 9))
    np.testing.assert_allclose([h["loss"] for h in hist2], [h["loss"] for h in hist],
                               rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharded_step_matches_single_device(tmp_path):
    teacher, scfg, student = _student()
    dc = distill.DistillConfig(**{**DC.__dict__, "steps": 3})
    _, single = distill.train(student, scfg, teacher, TINY, IDS, dc, tmp_path / "one",
                              progress=False)
    mesh = make_mesh("data:2,model:2")
    put = lambda w, cfg: jax.device_put(w, weight_shardings(weight_specs(cfg), mesh))
    params, sharded = distill.train(put(student, scfg), scfg, put(teacher, TINY), TINY, IDS,
                                    dc, tmp_path / "mesh", mesh=mesh, progress=False)
    assert len(params["layers"]["w_gate"].sharding.device_set) == 4
    np.testing.assert_allclose([h["loss"] for h in sharded], [h["loss"] for h in single],
                               rtol=1e-4)


def test_bad_config_raises():
    with pytest.raises(ConfigError, match="steps"):
        distill.DistillConfig(steps=0)
    with pytest.raises(ConfigError, match="temperature"):
        distill.DistillConfig(temperature=0)
    with pytest.raises(ConfigError, match="tokens"):
        distill.batch_at(IDS[:10], 0, DC)


@pytest.mark.slow  # (~40 s each on 2 cores)
@pytest.mark.parametrize("keep", [False, True])
def test_workdir_is_deleted_once_the_student_is_saved(smollm2_checkpoint, tmp_path, keep):
    """The training state (AdamW moments: 3x the student's float32 size; 1.9 GB for a
    20-layer SmolLM2 student) goes once the student checkpoint exists, unless kept."""
    from jaxinfer.checkpoint import is_checkpoint, save_checkpoint

    cfg = TINY.replace(vocab_size=49152)  # the real tokenizer's ids, tiny layers
    save_checkpoint(tmp_path / "teacher", cfg, jax.tree.map(np.asarray, tiny_weights(cfg)),
                    smollm2_checkpoint / "tokenizer")
    (tmp_path / "t.txt").write_text((ROOT / "data" / "botchan_ch1.txt").read_text()[:6000])
    dc = distill.DistillConfig(steps=2, batch_size=2, seq_len=16, save_every=1)
    s = distill.distill_checkpoint(tmp_path / "teacher", tmp_path / "t.txt",
                                   tmp_path / "student", dc, num_layers=2, progress=False,
                                   keep_workdir=keep)
    assert is_checkpoint(tmp_path / "student")
    work = tmp_path / "student.work"
    assert work.is_dir() == keep and s["workdir"] == (str(work) if keep else None)
    if keep:  # the resumable state of the last step
        assert (work / "state" / "2").is_dir()


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    distill.plot_history([{"step": i, "loss": 1 / i, "kl": 0.5 / i} for i in range(1, 5)],
                         tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_distill_script_on_smollm2(smollm2_checkpoint, tmp_path):
    text = tmp_path / "t.txt"
    shipped = ROOT / "data" / "botchan_ch1.txt"
    text.write_text(shipped.read_text() if shipped.is_file() else "The cat sat. " * 2000)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "student"
    cmd = [sys.executable, str(ROOT / "scripts" / "distill.py"), "--text_file", str(text),
           "--output", str(out), "--num_layers", "4", "--mlp_dim", "256", "--steps", "2",
           "--batch_size", "2", "--seq_len", "32", "--progress=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["num_layers"] == 4 and s["mlp_dim"] == 256 and s["params"] < s["teacher_params"]
    assert np.isfinite(s["perplexity_student"])
    assert s["workdir"] is None and not (tmp_path / "student.work").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error:")
    g = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint",
                        str(out), "--prompt", "Hello", "--max_new_tokens", "3",
                        "--output_format", "json"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert g.returncode == 0, g.stderr
