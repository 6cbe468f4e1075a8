r"""Answer extraction from model completions: the last ``\boxed{...}``, or the last number."""

import re

_BOXED_COMMANDS = ("\\boxed", "\\fbox")

# A number as written in a final answer: optional sign, thousands separators, decimals.
# ``1,000`` is one number; ``1,2,3`` is three (the last, ``3``, wins).
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def extract_boxed(text: str) -> str | None:
    r"""Return the content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``.

    Braces are matched with a counter, so nested groups such as ``\boxed{\frac{1}{2}}`` come
    back whole; escaped braces (``\{``, ``\}``) do not count. The short form ``\boxed 5``
    (one token after a space, as in some MATH solutions) is also read.

    Args:
        text: A completion or solution.

    Returns:
        The content of the last boxed answer, stripped of surrounding whitespace, or ``None``
        when there is no boxed answer or the last one is not closed (a truncated completion).

    Example:
        >>> extract_boxed(r"so $x = \boxed{\frac{1}{2}}$.")
        '\\frac{1}{2}'
        >>> extract_boxed("no answer") is None
        True

    """
    start = max(text.rfind(command) for command in _BOXED_COMMANDS)
    if start < 0:
        return None
    command = next(c for c in _BOXED_COMMANDS if text.startswith(c, start))
    position = start + len(command)
    rest = text[position:]
    if rest.startswith(" "):  # "\boxed 5": one token, ended by whitespace or "$"
        match = re.match(r" +([^\s$]+)", rest)
        return match.group(1) if match else None
    if not rest.startswith("{"):
        return None
    depth = 0
    index = position
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2  # skip the escaped character, e.g. "\{" or "\}"
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[position + 1 : index].strip()
        index += 1
    return None


def extract_last_number(text: str) -> str | None:
    """Return the last number in ``text`` with thousands separators removed.

    Args:
        text: A completion.

    Returns:
        The number as a string (e.g. ``"-1234.5"`` for ``"... is -1,234.5."``), or ``None``.

    Example:
        >>> extract_last_number("3 apples and 1,250 pears.")
        '1250'

    """
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None
