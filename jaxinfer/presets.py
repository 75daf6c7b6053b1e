"""Model and run presets shipped with the package (`configs/` in the repository).

    configs/models/<name>.json   a Hugging Face `config.json` (the published hyperparameters)
    configs/run/<name>.json      flag defaults for scripts: mesh, dtype, slots, buckets

Model presets stay in Hugging Face's format so they can be checked line by line against
the model card, and so `ModelConfig.from_hf` is the one parser. Run presets hold absl flag
values; `--config=<name or path>` makes them the defaults that explicit flags override.
Keys starting with "_" are comments. No JAX here: listing presets is instant.

>>> "smollm2-135m" in list_models()
True
>>> model_config("llama-3.1-8b").num_kv_heads
8
>>> run_preset("cpu")["dtype"]
'float32'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Every flag a run preset may set, across all scripts. A script applies the ones it
# defines and ignores the rest (a serving preset also works for generate.py).
RUN_KEYS = frozenset({
    "mesh", "fsdp", "num_cpu_devices", "distributed_timeout_s", "compilation_cache",
    "dtype", "num_slots", "max_len", "max_queue", "prefix_cache_mb", "min_prompt_bucket",
    "prefill_token_budget", "warmup", "max_new_tokens", "max_tokens", "temperature",
    "top_p", "top_k", "min_p", "seed", "checkpoint",
})


def _names(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.json"))


def list_models() -> list[str]:
    """Names of the model presets, e.g. 'llama-3.1-8b'."""
    return _names("models")


def list_runs() -> list[str]:
    """Names of the run presets, e.g. 'tpu-v5e-8'."""
    return _names("run")


def _read(kind: str, name_or_path: str | Path) -> dict[str, Any]:
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = CONFIG_DIR / kind / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(f"no {kind} preset {str(name_or_path)!r}; choose one of "
                          f"{_names(kind)} or give a path to a .json file")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read preset {str(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"preset {str(path)!r} must hold a JSON object")
    return data


def model_hf(name_or_path: str | Path) -> dict[str, Any]:
    """The preset's Hugging Face config dict (comment keys removed)."""
    return {k: v for k, v in _read("models", name_or_path).items() if not k.startswith("_")}


def model_config(name_or_path: str | Path) -> ModelConfig:
    """A `ModelConfig` for a named preset or a path to a Hugging Face config.json."""
    name = Path(name_or_path).stem if str(name_or_path).endswith(".json") else str(name_or_path)
    return ModelConfig.from_hf(model_hf(name_or_path), name=name)


def run_preset(name_or_path: str | Path) -> dict[str, Any]:
    """Flag values of a run preset; raises ConfigError on keys no script knows."""
    values = {k: v for k, v in _read("run", name_or_path).items() if not k.startswith("_")}
    unknown = sorted(set(values) - RUN_KEYS)
    if unknown:
        raise ConfigError(f"run preset {str(name_or_path)!r} sets unknown flags {unknown}; "
                          f"known: {sorted(RUN_KEYS)}")
    return values
