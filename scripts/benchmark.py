"""`jaxinfer-benchmark`; the code and its flags are in jaxinfer/cli/benchmark.py.

    python scripts/benchmark.py --help      # same as: jaxinfer-benchmark --help
"""

from jaxinfer.cli.launch import launch

if __name__ == "__main__":
    launch("benchmark")
