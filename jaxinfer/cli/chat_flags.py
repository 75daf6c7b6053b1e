"""--chat_template: a chat template in place of the model's own (vLLM's --chat-template),
for scripts that render chats (generate --chat, serve, batch)."""

from absl import flags

CHAT_TEMPLATE = flags.DEFINE_string(
    "chat_template", None, "A Jinja chat template to use instead of the model's own: a file "
    "path or the template text (for a model without one, or to change its format).")


def kwargs() -> dict:
    """LLM.load keyword arguments."""
    return {"chat_template": CHAT_TEMPLATE.value}
