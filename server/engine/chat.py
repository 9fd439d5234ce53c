"""Chat messages -> prompt token ids through the tokenizer's own chat template.

The template decides every special token (a real template writes its own `bos_token`), so the
rendered text is tokenized with add_special_tokens=False: tokenizing it with the defaults
would put a second BOS in front. This is what transformers' apply_chat_template(tokenize=True)
does too; rendering and tokenizing apart lets a template error become a clear 4xx.
"""

from __future__ import annotations

from typing import Any

from server.engine.errors import InvalidRequestError


class ChatTemplateError(InvalidRequestError):
    """The served model has no chat template, or its template refused these messages."""


def render_chat(tokenizer: Any, messages: list[dict[str, str]], *, model_name: str,
                add_generation_prompt: bool = True,
                add_special_tokens: bool = False) -> list[int]:
    """Token ids of `messages` followed by the template's generation prompt (the assistant's
    turn is what the model writes next; without it for counting a conversation alone).
    `add_special_tokens` tokenizes the rendered text with the tokenizer's special tokens too
    (vLLM's chat option of that name, for templates that write none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"the served model {model_name!r} has no chat template, so chat messages cannot "
            "be rendered; use /v1/completions with a plain prompt instead")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 TemplateError and the template's own raise_exception()
        raise ChatTemplateError(f"the chat template of {model_name!r} rejected the messages: "
                                f"{e}") from e
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
