"""`jaxinfer-prune`; the code and its flags are in jaxinfer/cli/prune.py.

    python scripts/prune.py --help      # same as: jaxinfer-prune --help
"""

from jaxinfer.cli.launch import launch

if __name__ == "__main__":
    launch("prune")
