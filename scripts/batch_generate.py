"""Generate for every line of a JSONL file, resumably; see jaxinfer/cli/batch.py.

    python scripts/batch_generate.py --input=prompts.jsonl --output=results.jsonl
    # same as: jaxinfer-batch --input=prompts.jsonl --output=results.jsonl
"""

from jaxinfer.cli.launch import launch

if __name__ == "__main__":
    launch("batch")
