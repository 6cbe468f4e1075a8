"""Docstring conventions of dgpo that the API pages read as Google style.

A griffe extension (mkdocs.yml, ``mkdocstrings`` → ``extensions``): it only rewrites the text
that mkdocstrings renders, never the source.

- ``Example:`` (ruff's Google convention accepts it) becomes ``Examples:``, the title griffe's
  Google parser reads as a code section (it renders any other title as prose, ``>>>`` included).
- Sphinx roles (``:class:`~dgpo.losses.PolicyLoss```, ``:func:`load_run```) become inline code:
  the last name for a ``~`` target, the whole target otherwise.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

EXAMPLE_TITLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def normalise(text: str) -> str:
    """Return ``text`` with ``Example:`` titles and Sphinx roles rewritten (see the module doc).

    Examples:
        >>> normalise("See :class:`~dgpo.losses.PolicyLoss` or :func:`dgpo.losses.build_loss`.")
        'See `PolicyLoss` or `dgpo.losses.build_loss`.'
    """
    return SPHINX_ROLE.sub(_role, EXAMPLE_TITLE.sub(r"\1Examples:", text))


class DocstringConventions(griffe.Extension):
    """Rewrite every docstring (see the module doc) before mkdocstrings parses it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Normalise the docstring of each object griffe loads."""
        if obj.docstring is not None:
            obj.docstring.value = normalise(obj.docstring.value)
