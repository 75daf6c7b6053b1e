"""GGUF or Hugging Face weights to a jaxinfer checkpoint; the code is in jaxinfer/cli/convert.py.

    python scripts/convert.py --help      # same as: jaxinfer-convert --help
"""

from jaxinfer.cli.launch import launch

if __name__ == "__main__":
    launch("convert")
