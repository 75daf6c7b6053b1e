"""`jaxinfer-quantize`; the code and its flags are in jaxinfer/cli/quantize.py.

    python scripts/quantize.py --help      # same as: jaxinfer-quantize --help
"""

from jaxinfer.cli.launch import launch

if __name__ == "__main__":
    launch("quantize")
