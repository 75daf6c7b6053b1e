"""`jaxinfer-eval-perplexity`; the code and its flags are in jaxinfer/cli/eval_perplexity.py.

    python scripts/eval_perplexity.py --help      # same as: jaxinfer-eval-perplexity --help
"""

from jaxinfer.cli.launch import launch

if __name__ == "__main__":
    launch("eval_perplexity")
