"""`jaxinfer-distill`; the code and its flags are in jaxinfer/cli/distill.py.

    python scripts/distill.py --help      # same as: jaxinfer-distill --help
"""

from jaxinfer.cli.launch import launch

if __name__ == "__main__":
    launch("distill")
