"""`jaxinfer-quantize`; the code and its flags are in jaxinfer/cli/quantize.py.

    python scripts/quantize.py --help      # same as: jaxinfer-quantize --help
"""

from jaxinfer.cli.quantize import run

if __name__ == "__main__":
    run()
