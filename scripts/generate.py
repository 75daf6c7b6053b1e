"""Generate text from a prompt; the code is in jaxinfer/cli/generate.py.

    python scripts/generate.py --help      # same as: jaxinfer-generate --help
"""

from jaxinfer.cli.launch import launch

if __name__ == "__main__":
    launch("generate")
