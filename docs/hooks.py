"""mkdocs hook: Sphinx cross-reference roles in the docstrings, as links.

The package's docstrings name objects the Sphinx way (``:class:`Task```,
``:func:`~p2pfed.model_vector.model_fingerprint```); the Markdown mkdocstrings renders
leaves the role text in front of a code span. This turns each into the code span alone
(``~`` keeps only the last name, as in Sphinx), linked to the object's heading when the
page documents it.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj):<code>(~?)([^<]+)</code>")
_ID = re.compile(r'\bid="([A-Za-z_][\w.]*)"')


def on_page_content(html: str, **kwargs: Any) -> str:
    """Replace the roles of one rendered page (mkdocs calls this for every page)."""
    ids = set(_ID.findall(html))

    def link(match: re.Match[str]) -> str:
        short, name = match.group(1), match.group(2)
        shown = name.rsplit(".", 1)[-1] if short else name
        if name in ids:
            target = name
        else:
            ends = [i for i in ids if i.endswith("." + name)]
            target = ends[0] if len(ends) == 1 else ""
        code = f"<code>{shown}</code>"
        return f'<a href="#{target}">{code}</a>' if target else code

    return _ROLE.sub(link, html)
