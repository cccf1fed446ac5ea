"""Prompt templating: split the filled template at ``<image>`` into the text before and after the image.

The visual tokens are spliced between the two token runs on the host, so the prompt itself is never expanded
to N image tokens.
"""

from __future__ import annotations

from ..errors import PromptError

IMAGE_MARK = "<image>"


def split_prompt(template: str, prompt: str) -> tuple[str, str]:
    """Fill ``template`` with ``prompt`` and split it at the image.

    Args:
        template: text with exactly one ``<image>`` and one ``{prompt}``.
        prompt: the user's question.
    Returns:
        (text before the image, text after the image).
    Raises:
        PromptError: the prompt is empty or contains ``<image>`` itself.
    """
    if not prompt.strip():
        raise PromptError("the prompt is empty; pass --prompt 'your question'")
    if IMAGE_MARK in prompt:
        raise PromptError(f"the prompt must not contain {IMAGE_MARK!r}: the image is placed by the template")
    filled = template.replace("{prompt}", prompt)
    prefix, _, suffix = filled.partition(IMAGE_MARK)
    return prefix, suffix


def check_context(prefix: int, visual: int, suffix: int, new_tokens: int, max_positions: int) -> None:
    """Raise :class:`PromptError` when the sequence cannot fit the model's context.

    Args:
        prefix, visual, suffix: token counts of the prompt parts (``visual`` = positions the image occupies).
        new_tokens: tokens to generate.
        max_positions: the LLM's ``max_position_embeddings``.
    """
    need = prefix + visual + suffix + new_tokens
    if need > max_positions:
        raise PromptError(
            f"prompt ({prefix + suffix} text tokens) + {visual} image positions + {new_tokens} new tokens = {need} "
            f"exceeds the model's context of {max_positions}; shorten the prompt or lower --max-new-tokens"
        )
