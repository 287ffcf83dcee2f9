"""A conversation -> prompt token ids, by the chat template the build kept with its tokenizer.

transformers renders the template (jinja2, in its sandbox) exactly as `apply_chat_template` does for the
checkpoint; the whole conversation is rendered every turn, ending where the assistant's reply starts.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import RequestError


def require(tokenizer, out) -> None:
    """Refuse chat where the build kept no chat template (a base model's tokenizer has none)."""
    if tokenizer is None or not tokenizer.chat_template:
        raise RequestError(f"{out} has no chat template (its checkpoint's tokenizer has none: a base model?); "
                           "use --prompt, or build from a chat/instruct checkpoint")


def render(tokenizer, messages: Sequence[dict]) -> list[int]:
    """`messages` in transformers' format ([{"role": "user", "content": "..."}, ...]) as prompt token ids."""
    from jinja2.exceptions import TemplateError

    if isinstance(messages, (str, dict)) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
        raise RequestError('messages must be a non-empty list of {"role": ..., "content": ...} dicts')
    try:
        return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_dict=False))
    except TemplateError as exc:  # the template's own raise_exception, e.g. roles that must alternate
        raise RequestError(f"the chat template refuses this conversation: {exc}") from None
