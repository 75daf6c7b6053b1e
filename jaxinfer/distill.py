"""Knowledge distillation with optax: a smaller student learns the teacher's next tokens.

    loss = tau^2 * KL(softmax(z_teacher / tau) || softmax(z_student / tau))
           + hard_weight * CE(z_student, next token)
    train_step(state, teacher_weights, tokens_BT) -> (state, metrics)   pure, jitted
Tokens are windows [B, T + 1]: both models read [:, :-1], hard labels are [:, 1:]. The
student starts from the teacher (prune.py picks its layers and MLP channels), so it begins
close and learns fast. Weights keep the inference tree and shardings (weight_shardings), so
the step runs on the same meshes as generation and the result is an ordinary checkpoint.
`train` adds the loop: deterministic batches per step, an Orbax CheckpointManager (a rerun
resumes from the last saved step), a progress bar and the loss history.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.kv_cache import KVCache, kv_shapes
from jaxinfer.model import hidden_states, unembed
from jaxinfer.weights import Weights


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128  # T: tokens the models read per window
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    temperature: float = 2.0  # tau, softens both distributions
    hard_weight: float = 0.0  # weight of the cross-entropy on the true next token
    save_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for f in ("steps", "batch_size", "seq_len", "save_every"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.learning_rate <= 0 or self.temperature <= 0 or self.hard_weight < 0:
            raise ConfigError(f"need learning_rate > 0, temperature > 0, hard_weight >= 0; got "
                              f"{self.learning_rate}, {self.temperature}, {self.hard_weight}")


def logits(weights: Weights, tokens_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [B, T, V] of a whole window (a throwaway cache of exactly T slots)."""
    B, T = tokens_BT.shape
    k, v = kv_shapes(cfg, B, T)
    dtype = weights["embed"].dtype
    cache = KVCache(jnp.zeros(k, dtype), jnp.zeros(v, dtype), jnp.zeros((B,), jnp.int32))
    x, _ = hidden_states(weights, tokens_BT, cache, cfg)
    return unembed(weights, x, cfg)


def kd_loss(student_BTV: jax.Array, teacher_BTV: jax.Array, labels_BT: jax.Array,
            temperature: float, hard_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Distillation loss and its parts (kl is at temperature tau, unscaled, per token)."""
    ls = jax.nn.log_softmax(student_BTV / temperature, -1)
    lt = jax.nn.log_softmax(teacher_BTV / temperature, -1)
    kl = jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), -1))
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(student_BTV, -1),
                                       labels_BT[..., None], -1))
    loss = temperature ** 2 * kl + hard_weight * ce
    return loss, {"loss": loss, "kl": kl, "ce": ce}


def make_optimizer(dc: DistillConfig) -> optax.GradientTransformation:
    warmup = min(dc.warmup_steps, dc.steps - 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, dc.learning_rate, warmup,
                                               max(dc.steps, warmup + 1), dc.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))


def make_train_step(optimizer: optax.GradientTransformation, student_cfg: ModelConfig,
                    teacher_cfg: ModelConfig, dc: DistillConfig,
                    state_shardings: Any = None) -> Callable:
    """The pure step `(state, teacher_weights, tokens_BT) -> (state, metrics)`, jitted with
    the state donated; state = {"params", "opt_state", "step"}."""

    def step(state, teacher_weights, tokens_BT):
        inputs, labels = tokens_BT[:, :-1], tokens_BT[:, 1:]
        t = jax.lax.stop_gradient(logits(teacher_weights, inputs, teacher_cfg))

        def loss_fn(params):
            return kd_loss(logits(params, inputs, student_cfg), t, labels, dc.temperature,
                           dc.hard_weight)

        grads, metrics = jax.grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, None))


def init_state(optimizer: optax.GradientTransformation, params: Weights) -> dict[str, Any]:
    """Optimizer state placed like the params (jit keeps each moment on its weight's shards).
    The params are copied: a student sliced from the teacher shares its embedding buffers,
    and the step donates the state."""
    params = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(params)
    return {"params": params, "opt_state": jax.jit(optimizer.init)(params),
            "step": jnp.zeros((), jnp.int32)}


def batch_at(ids: np.ndarray, step: int, dc: DistillConfig) -> np.ndarray:
    """Training windows [B, T + 1] for `step`: random offsets from (seed, step), so a resumed
    run sees exactly the batches an uninterrupted one would."""
    n = len(ids) - dc.seq_len - 1
    if n < 1:
        raise ConfigError(f"training text has {len(ids)} tokens, need more than "
                          f"seq_len + 1 = {dc.seq_len + 1}")
    off = np.random.default_rng([dc.seed, step]).integers(0, n + 1, dc.batch_size)
    return np.stack([ids[o: o + dc.seq_len + 1] for o in off]).astype(np.int32)


def train(student: Weights, student_cfg: ModelConfig, teacher: Weights,
          teacher_cfg: ModelConfig, train_ids: np.ndarray, dc: DistillConfig,
          workdir: str | Path, mesh: jax.sharding.Mesh | None = None,
          progress: bool = True) -> tuple[Weights, list[dict[str, float]]]:
    """Distill for dc.steps steps (resuming from `workdir` if it holds a checkpoint).

    Returns the student weights and the loss history [{"step", "loss", "kl", "ce"}, ...]
    of every step so far, including those of earlier (resumed) runs.
    """
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from jaxinfer.checkpoint import _quiet, write_errors

    workdir = Path(workdir).absolute()
    optimizer = make_optimizer(dc)
    state = init_state(optimizer, student)
    if mesh is not None:  # scalars (step, Adam's count) replicated over the params' mesh
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = jax.device_put(state, jax.tree.map(
            lambda a: a.sharding if isinstance(a.sharding, jax.sharding.NamedSharding)
            else replicated, state))
    shardings = jax.tree.map(lambda a: a.sharding, state)
    step_fn = make_train_step(optimizer, student_cfg, teacher_cfg, dc, shardings)
    batch_sharding = None
    if mesh is not None and "data" in mesh.axis_names and dc.batch_size % mesh.shape["data"] == 0:
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    history_path = workdir / "history.json"
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with _quiet(), write_errors(f"training state in {workdir}"), \
            ocp.CheckpointManager(workdir / "state", options=options) as mngr:
        history: list[dict[str, float]] = []
        start = mngr.latest_step() or 0
        if start:
            abstract = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
            state = mngr.restore(start, args=ocp.args.StandardRestore(abstract))
            if history_path.is_file():
                history = [h for h in json.loads(history_path.read_text()) if h["step"] <= start]
        bar = tqdm(range(start, dc.steps), initial=start, total=dc.steps, disable=not progress,
                   desc="distill", unit="step")
        for i in bar:
            tokens = batch_at(train_ids, i, dc)
            tokens = (jax.device_put(tokens, batch_sharding) if batch_sharding is not None
                      else jnp.asarray(tokens))
            state, metrics = step_fn(state, teacher, tokens)
            m = {k: float(v) for k, v in metrics.items()}
            history.append({"step": i + 1, **m})
            bar.set_postfix(loss=f"{m['loss']:.3f}", kl=f"{m['kl']:.3f}")
            if (i + 1) % dc.save_every == 0 or i + 1 == dc.steps:
                mngr.save(i + 1, args=ocp.args.StandardSave(state), force=True)
                history_path.write_text(json.dumps(history))  # resume keeps steps <= saved
        mngr.wait_until_finished()
    history_path.write_text(json.dumps(history))
    return state["params"], history


def plot_history(history: list[dict[str, float]], path: str | Path) -> None:
    """Loss curve (total loss and KL per step) as an image."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("plotting needs matplotlib (pip install matplotlib)") from e
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in history], label="loss (tau^2 KL + hard CE)")
    ax.plot(steps, [h["kl"] for h in history], label="KL(teacher || student) at tau")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def distill_checkpoint(teacher_dir: str | Path, text_file: str | Path, output: str | Path,
                       dc: DistillConfig, num_layers: int | None = None,
                       mlp_dim: int | None = None, layer_selection: str = "every_other",
                       workdir: str | Path | None = None, held_out: float = 0.1,
                       mesh: jax.sharding.Mesh | None = None, plot: str | Path | None = None,
                       progress: bool = True, keep_workdir: bool = False) -> dict[str, Any]:
    """Teacher checkpoint -> student checkpoint (with the teacher's tokenizer).

    The student keeps `num_layers` layers (evenly spaced, or the least redundant by
    prune.calibrate) and the `mlp_dim` most important MLP channels of each. Training resumes
    from `workdir` (default: output + ".work"), which is deleted once the student is saved
    unless `keep_workdir` (it holds the optimizer state: three times the student's float32
    size). Returns sizes, held-out perplexities, time.
    """
    import time

    from jaxinfer import prune
    from jaxinfer.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
    from jaxinfer.errors import CheckpointError
    from jaxinfer.tokenizer import load_tokenizer
    from jaxinfer.weights import count_params, weight_shardings, weight_specs

    teacher_dir, output = Path(teacher_dir), Path(output)
    if output.exists() and (is_checkpoint(output) or any(output.iterdir())):
        raise CheckpointError(f"output already exists: {output}")
    if layer_selection not in ("every_other", "importance"):
        raise ConfigError(f"layer_selection must be 'every_other' or 'importance', "
                          f"got {layer_selection!r}")
    place = lambda cfg: (weight_shardings(weight_specs(cfg), mesh) if mesh is not None
                         else None)
    shardings = place(ModelConfig.load(teacher_dir / "config.json")) if mesh else None
    tcfg, teacher = load_checkpoint(teacher_dir, shardings=shardings)
    train_ids, test_ids = prune.split_ids(
        prune.text_ids(text_file, load_tokenizer(teacher_dir / "tokenizer")), held_out)
    imp = prune.calibrate(teacher, prune.windows(train_ids, dc.seq_len, dc.batch_size, 2), tcfg)
    n = num_layers or tcfg.num_layers
    keep = (prune.evenly_spaced_layers(tcfg.num_layers, n) if layer_selection == "every_other"
            else prune.layers_to_keep(imp.layer_cos_L, n))
    ch = prune.channels_to_keep(imp.channel_LF, mlp_dim) if mlp_dim else None
    scfg, student = prune.prune_weights(teacher, tcfg, keep, ch)
    if mesh is not None:
        student = jax.device_put(student, place(scfg))
    # Perplexity needs one held-out window of seq_len + 1 tokens; None on shorter texts.
    ppl = lambda w, c: (prune.perplexity(w, c, test_ids, dc.seq_len, dc.batch_size)
                        if len(test_ids) > dc.seq_len else None)
    ppl_init = ppl(student, scfg)
    t0 = time.perf_counter()
    workdir = Path(workdir or output.parent / f"{output.name}.work")
    student, history = train(student, scfg, teacher, tcfg, train_ids, dc, workdir, mesh,
                             progress)
    train_s = time.perf_counter() - t0
    save_checkpoint(output, scfg, student, teacher_dir / "tokenizer")
    if plot:
        plot_history(history, plot)
    if not keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "layers_kept": keep, "num_layers": scfg.num_layers, "mlp_dim": scfg.mlp_dim,
        "params": count_params(weight_specs(scfg)),
        "teacher_params": count_params(weight_specs(tcfg)),
        "train_tokens": int(len(train_ids)), "held_out_tokens": int(len(test_ids)),
        "steps": dc.steps, "train_seconds_this_run": round(train_s, 1),
        "first_kl": history[0]["kl"], "last_kl": history[-1]["kl"],
        "perplexity_teacher": ppl(teacher, tcfg), "perplexity_student_init": ppl_init,
        "perplexity_student": ppl(student, scfg),
        "workdir": str(workdir) if keep_workdir else None}
