"""Run llama.cpp's own convert_hf_to_gguf.py over several Hugging Face directories in one
process (torch and transformers import once):

    python tests/llama_cpp_convert.py CONVERTER_DIR IN_DIR=OUT_FILE=OUTTYPE ...

The tiny test checkpoints have no real tokenizer, so each model class's `set_vocab` is
replaced by a stand-in vocabulary of vocab_size plain tokens; the weights, their names
and layouts and every hyperparameter are written by llama.cpp's code as it stands. Prints
"converted OUT_FILE" or "failed OUT_FILE: error" per file.
"""

import json
import runpy
import sys
import traceback
from pathlib import Path

root, jobs = Path(sys.argv[1]), sys.argv[2:]
sys.path[:0] = [str(root), str(root / "gguf-py")]


def set_vocab(self):
    n = self.hparams.get("vocab_size") or self.hparams["text_config"]["vocab_size"]
    w = self.gguf_writer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>" for i in range(n)])
    w.add_token_types([1] * n)
    w.add_token_merges([])


def load_hparams(dir_model, is_mistral_format):
    """transformers 5's AutoConfig folds legacy keys (GPT-NeoX's rotary_pct) into
    rope_parameters and drops them; the converter, written against transformers 4, reads
    them: config.json's own keys are kept beside AutoConfig's."""
    config = hparams(dir_model, is_mistral_format)
    if not is_mistral_format and (Path(dir_model) / "config.json").is_file():
        for key, value in json.loads((Path(dir_model) / "config.json").read_text()).items():
            config.setdefault(key, value)
    return config


from conversion.base import ModelBase  # noqa: E402

hparams = ModelBase.load_hparams
ModelBase.load_hparams = staticmethod(load_hparams)
converter = runpy.run_path(str(root / "convert_hf_to_gguf.py"), run_name="llama_cpp_converter")
model_class = converter["get_model_class"]


def with_stand_in_vocab(*args, **kwargs):
    cls = model_class(*args, **kwargs)
    cls.set_vocab = set_vocab
    return cls


converter["main"].__globals__["get_model_class"] = with_stand_in_vocab
for job in jobs:
    src, out, outtype = job.split("=")
    sys.argv = ["convert_hf_to_gguf.py", src, "--outtype", outtype, "--outfile", out]
    try:
        converter["main"]()
        print("converted", out, flush=True)
    except BaseException as e:  # (the converter exits on models it does not know)
        traceback.print_exc()
        print(f"failed {out}: {e!r}", flush=True)
