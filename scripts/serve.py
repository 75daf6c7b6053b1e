"""Serve a checkpoint over an OpenAI-compatible HTTP API; see jaxinfer/cli/serve.py.

    python scripts/serve.py --port 8000      # same as: jaxinfer-serve --port 8000
"""

from jaxinfer.cli.launch import launch

if __name__ == "__main__":
    launch("serve")
