"""--tool_call_parser and --reasoning_parser: how the server and batch jobs read a
model's tool calls and reasoning out of its chat answers."""

from absl import flags

from jaxinfer.reasoning import PARSERS as REASONING_PARSERS
from jaxinfer.tool_calls import PARSERS as TOOL_PARSERS

TOOL_PARSER = flags.DEFINE_enum("tool_call_parser", None, list(TOOL_PARSERS),
                                "Reads tool calls from the model's text, which tool_choice "
                                "\"auto\" needs: hermes (<tool_call>{...}</tool_call>: "
                                "Hermes, Qwen2.5+, Granite 4), llama3_json (Llama 3.1-3.3), "
                                "mistral ([TOOL_CALLS]), pythonic ([f(a=1)]: Llama 3.2, "
                                "Llama 4), deepseek_v3/deepseek_v31, granite (3.x), glm45, "
                                "qwen3_coder, kimi_k2, openai (gpt-oss; with the "
                                "openai_gptoss reasoning parser); see README.")
REASONING_PARSER = flags.DEFINE_enum("reasoning_parser", None, list(REASONING_PARSERS),
                                     "Moves a thinking model's <think>...</think> (qwen3, "
                                     "deepseek_r1) or gpt-oss's analysis channel "
                                     "(openai_gptoss) out of chat answers into "
                                     "reasoning_content.")


def kwargs() -> dict:
    return {"tool_call_parser": TOOL_PARSER.value, "reasoning_parser": REASONING_PARSER.value}
