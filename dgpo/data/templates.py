"""Turn a problem statement into the prompt text the policy sees."""

import string
from typing import Any

DEFAULT_TEMPLATE = (
    "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)
"""The user message by default: the problem plus the instruction used by Qwen2.5-Math's harness.

Templates are ``str.format`` strings, so literal braces are doubled: ``\\boxed{{}}``."""


def validate_template(template: str) -> None:
    r"""Check that ``template`` is a ``str.format`` string whose only field is ``{problem}``.

    Args:
        template: The template, e.g. ``"{problem}\nAnswer in \boxed{{}}."``.

    Raises:
        ValueError: If the template does not parse, lacks ``{problem}`` or has another field
            (a single ``{}`` from ``\boxed{}`` is the usual culprit: write ``\boxed{{}}``).

    """
    if not isinstance(template, str):
        raise ValueError(f"template must be a string, got {type(template).__name__}")
    try:
        fields = [
            field for _, field, _, _ in string.Formatter().parse(template) if field is not None
        ]
    except ValueError as err:
        raise ValueError(
            f"template {template!r} is not a valid str.format string ({err}); "
            "write literal braces as {{ and }}"
        ) from err
    others = [field for field in fields if field != "problem"]
    if others:
        raise ValueError(
            f"template {template!r} has replacement fields {others}; the only allowed field is "
            "{problem}: write literal braces as {{ and }}, e.g. \\boxed{{}}"
        )
    if "problem" not in fields:
        raise ValueError(f"template {template!r} must contain the field {{problem}}")


def format_prompt(
    problem: str,
    tokenizer: Any = None,
    template: str | None = None,
    use_chat_template: bool = True,
    system_prompt: str | None = None,
) -> str:
    r"""Build the prompt text for one problem.

    The user message is ``template.format(problem=problem)``. With ``use_chat_template`` it is
    wrapped, after an optional system message, by the tokenizer's chat template with
    ``add_generation_prompt=True``, so the text ends where the assistant's answer starts. The
    result may then already contain special tokens such as BOS: tokenize it with
    ``add_special_tokens=False``. Without the chat template the user message is returned as is,
    preceded by ``system_prompt`` and a blank line when one is given.

    Args:
        problem: The problem statement.
        tokenizer: A Hugging Face tokenizer with a chat template; only needed when
            ``use_chat_template`` is true.
        template: ``str.format`` template with a ``{problem}`` field; ``None`` means
            :data:`DEFAULT_TEMPLATE`. Use ``"{problem}"`` for the bare problem.
        use_chat_template: Whether to apply the tokenizer's chat template.
        system_prompt: Optional system message.

    Returns:
        The prompt text.

    Raises:
        ValueError: If the template is invalid, or the chat template is asked for and the
            tokenizer is missing or has none.

    Example:
        >>> format_prompt("What is 2 + 2?", None, "Q: {problem}\nA:", use_chat_template=False)
        'Q: What is 2 + 2?\nA:'

    """
    template = DEFAULT_TEMPLATE if template is None else template
    validate_template(template)
    content = template.format(problem=problem)
    if not use_chat_template:
        return content if system_prompt is None else f"{system_prompt}\n\n{content}"
    check_chat_template(tokenizer)
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": content})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise ValueError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def check_chat_template(tokenizer: Any) -> None:
    """Raise unless ``tokenizer`` is a tokenizer with a chat template.

    Args:
        tokenizer: The tokenizer to check.

    Raises:
        ValueError: If the tokenizer is ``None`` or has no chat template.

    """
    if tokenizer is None:
        raise ValueError("use_chat_template=True needs a tokenizer, got None")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} "
            "has no chat template; set use_chat_template=False (plain template) or give the "
            "tokenizer a chat_template"
        )
