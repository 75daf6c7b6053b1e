"""The native checkpoint: a directory of config.json, Orbax weights/ and a tokenizer/.

    path/config.json    ModelConfig.save
    path/weights/       Orbax PyTree checkpoint of the weight tree
    path/tokenizer/     files load_tokenizer(path/"tokenizer") reads (optional)
    path/quant.json     quant.QuantConfig of a quantized checkpoint (absent: float)

Orbax restores straight into the abstract tree from `weights.weight_specs`, so with
shardings each device reads only its own slice: a model larger than host memory loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.quant import QuantConfig, infer_config
from jaxinfer.weights import Weights, abstract_weights, check_weights, is_info, weight_specs

# Orbax's data files (and the chunks of larger arrays) are cut at this size: tensorstore
# builds each in memory before writing it, so with the default (about 2 GB) saving a
# converted 0.85B-parameter model held ~1.3 GB of buffers at once, ~0.4 GB with this.
DATA_FILE_BYTES = 64 * 2**20
# Files Orbax writes at the top of every finished PyTree checkpoint (either suffices).
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA")


def is_checkpoint(path: str | Path) -> bool:
    """True if `path` looks like a finished jaxinfer checkpoint (cheap: no weights read)."""
    p = Path(path)
    return ((p / "config.json").is_file()
            and any((p / "weights" / m).is_file() for m in _ORBAX_MARKERS))


def load_quant_config(path: str | Path) -> QuantConfig | None:
    """The quantization a checkpoint was saved with (None for a float checkpoint)."""
    f = Path(path) / "quant.json"
    if not f.is_file():
        return None
    try:
        return QuantConfig.load(f)
    except (ConfigError, OSError) as e:
        raise CheckpointError(f"bad quantization config in checkpoint {path}: {e}") from e


def save_checkpoint(path: str | Path, cfg: ModelConfig, weights: Weights,
                    tokenizer_dir: str | Path | None = None, dtype: Any = None) -> None:
    """Write `cfg`, `weights` (float leaves cast to `dtype` if given) and tokenizer files
    under `path`. A quantized tree (QArray leaves) also records its QuantConfig.

    Blocks until the weights are on disk. `path` must not exist or be an empty directory.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"checkpoint path already exists and is not empty: {path}")
    try:
        quant = infer_config(weights)
        check_weights(weight_specs(cfg, quant=quant), weights)
    except ConfigError as e:
        raise CheckpointError(f"weights do not match the config for {path}: {e}") from e
    if dtype is not None:
        dt = jnp.dtype(dtype)
        cast = lambda a: (np.asarray(a).astype(dt, copy=False)
                          if jnp.issubdtype(a.dtype, jnp.floating) else a)
        weights = jax.tree.map(cast, weights)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise CheckpointError(f"tokenizer directory not found: {tokenizer_dir}")
    # Written beside the target and renamed at the end: an interrupted save leaves no
    # half-written directory that is_checkpoint() could mistake for a good one.
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with write_errors(f"checkpoint {path}"):
            tmp.mkdir(parents=True)
            cfg.save(tmp / "config.json")
            if quant is not None:
                quant.save(tmp / "quant.json")
            with _quiet(), _checkpointer(weights) as ckptr:
                ckptr.save(tmp / "weights", args=ocp.args.PyTreeSave(
                    weights, ocdbt_target_data_file_size=DATA_FILE_BYTES))
            if tokenizer_dir is not None:
                shutil.copytree(tokenizer_dir, tmp / "tokenizer")
                (tmp / "tokenizer").chmod(tmp.stat().st_mode)  # not a temp dir's 0700
            if path.exists():
                path.rmdir()
            tmp.rename(path)
    finally:
        _remove(tmp)


def _checkpointer(weights: Weights):
    """Orbax's PyTree checkpointer, writing uncompressed unless the tree holds int4: zstd
    (Orbax's default) made restoring SmolLM2 take 0.7-0.9 s instead of 0.45 s from the page
    cache, and no less from disk, for 330 MB on disk instead of 514 MB (float weights
    compress little; these dequantized Q4_1 ones are the exception), but Orbax writes int4
    a byte per value, which only compression brings back to about its packed size. For a
    tree of host (numpy) arrays, as converters make, it writes them without Orbax's default
    defensive copy of every host array, which doubled a conversion's peak host memory (the
    save blocks, so nothing changes them). Restores read either kind."""
    import orbax.checkpoint as ocp

    leaves = jax.tree.leaves(weights)
    kw: dict[str, Any] = {"use_compression": any(
        np.dtype(x.dtype) in (np.dtype(jnp.int4), np.dtype(jnp.uint4)) for x in leaves)}
    if all(isinstance(x, np.ndarray) for x in leaves):
        th = ocp.type_handlers
        kw["type_handler_registry"] = th.create_type_handler_registry(
            (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, th.ArrayHandler()),  # none in this tree; its absence logs a warning
            *((t, th.ScalarHandler()) for t in (int, float, np.number)))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**kw))


def _remove(tmp: Path) -> None:
    """Remove a partial save. After a failed write Orbax's other writer threads may still
    be creating files in it for a moment, so one rmtree can leave the directory behind."""
    for _ in range(50):
        shutil.rmtree(tmp, ignore_errors=True)
        if not tmp.exists():
            return
        time.sleep(0.1)


@contextlib.contextmanager
def write_errors(what: str):
    """A failed write inside the block as a CheckpointError naming `what`. Orbax reports a
    full disk or an unwritable file as a ValueError from its async writer
    ("RESOURCE_EXHAUSTED: Error writing ... No space left on device"); other ValueErrors
    are bugs and pass through."""
    try:
        yield
    except (OSError, ValueError) as e:
        if isinstance(e, ValueError) and "Error writing" not in str(e):
            raise
        reason = str(e).splitlines()[0]
        reason = reason[reason.find("Failed to write"):] if "Failed to write" in reason else reason
        raise CheckpointError(f"cannot write {what}: {reason}") from e


def load_checkpoint(path: str | Path, dtype: Any = jnp.float32,
                    shardings: Weights | None = None) -> tuple[ModelConfig, Weights]:
    """Restore `(config, weights)`; weights are jax Arrays of `dtype`, placed per `shardings`
    (a tree like the weights of jax Shardings) or on the default device."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not is_checkpoint(path):
        raise CheckpointError(f"not a jaxinfer checkpoint (needs config.json and Orbax "
                              f"weights/): {path}")
    try:
        cfg = ModelConfig.load(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"bad config in checkpoint {path}: {e}") from e
    specs = weight_specs(cfg, jnp.dtype(dtype), load_quant_config(path))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_weights(specs))
    target = abstract_weights(specs, shardings)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        with _quiet(), ocp.PyTreeCheckpointer() as ckptr:
            _check_stored(ckptr.metadata(path / "weights").item_metadata, specs, path)
            weights = ckptr.restore(path / "weights", args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args))
    except CheckpointError:
        raise
    except (ValueError, OSError, KeyError) as e:  # unreadable metadata, missing arrays
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot restore weights of checkpoint {path}: {msg}") from e
    return cfg, weights


def _check_stored(meta: Any, specs: Weights, path: Path) -> None:
    """Compare names and shapes on disk with the config before restoring: a mismatch gets a
    clear message, and Orbax's async restore is never started on a tree it would reject."""
    stored = {_name(p): tuple(m.shape) for p, m in
              jax.tree.flatten_with_path(getattr(meta, "tree", None) or {})[0]}
    want = {_name(p): a.shape for p, a in
            jax.tree.flatten_with_path(specs, is_leaf=is_info)[0]}
    if not stored:
        raise CheckpointError(f"no readable Orbax weights in {path / 'weights'}")
    for name in sorted(set(stored) | set(want)):
        got, exp = stored.get(name), want.get(name)
        if got != exp:
            what = ("is missing" if got is None else "is not in the config" if exp is None
                    else f"has shape {got}, config expects {exp}")
            raise CheckpointError(f"checkpoint {path} does not match its config.json: "
                                  f"weight {name} {what}")


def _name(path: tuple) -> str:
    """'layers/wq/scales' for a dict path or a QArray attribute path alike (Orbax's
    metadata lists QArray fields as dict keys)."""
    keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(k) for k in keys)


def _reported_write_failure(record: logging.LogRecord) -> bool:
    """Orbax's writer threads log a failed write with its traceback before the saving
    thread sees it; write_errors reports it as one CheckpointError, so drop the log."""
    return not ("orbax" in record.pathname and "Error writing" in record.getMessage())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Orbax logs every step at INFO through absl; keep scripts' stderr readable. A failed
    write is reported once (write_errors), not also as writer-thread tracebacks: the log
    records above and the asyncio callbacks that then find Orbax's event loop closed."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    unraisable = sys.unraisablehook

    def closed_loop(u) -> None:
        if not (isinstance(u.exc_value, RuntimeError)
                and str(u.exc_value) == "Event loop is closed"):
            unraisable(u)

    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
        lg.addFilter(_reported_write_failure)
    sys.unraisablehook = closed_loop
    try:
        yield
        sys.unraisablehook = unraisable  # after a failure the callbacks keep arriving
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
            lg.removeFilter(_reported_write_failure)
