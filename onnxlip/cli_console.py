"""The CLI's consoles: a model's tensor names and op types reach the terminal in the human output, so every string
printed goes through `visible`, which shows control characters as escapes instead of letting the terminal obey them."""

from __future__ import annotations

import re

from rich.console import Console
from rich.text import Text

# control characters a model's names or op types may carry: C0 (but the newline messages use for layout), DEL, C1,
# and the bidirectional embeddings, overrides and isolates (they reorder what a terminal shows)
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """`text` with its control characters as visible Python escapes (ESC as \\x1b): a model's tensor names and op
    types reach the terminal in the human output, and an escape sequence in one would be obeyed (change the title,
    clear the screen, hide text)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _visible_text(text: Text) -> Text:
    """A rich Text with visible(...) applied to its characters, its styles kept."""
    plain = text.plain
    if not _CONTROL.search(plain):
        return text
    shown = text.blank_copy()
    pos = 0
    for m in _CONTROL.finditer(plain):
        shown.append_text(text[pos : m.start()])
        start = len(shown)
        shown.append(visible(m.group()))
        for span in text[m.start() : m.end()].spans:
            shown.stylize(span.style, start, len(shown))
        pos = m.end()
    shown.append_text(text[pos:])
    return shown


def styled(*parts) -> Text:
    """Text.assemble of strings and (string, style) pairs, with visible(...) applied first: rich's Text drops some
    control characters (BEL, CR) without a trace, which the consoles could then not show."""
    return Text.assemble(*((visible(p[0]), p[1]) if isinstance(p, tuple) else visible(p) for p in parts))


class SafeConsole(Console):
    """A Console that prints control characters as visible escapes: every string it renders (messages, table cells
    and titles) and every Text. (--json output needs no such care: json.dumps escapes them.)"""

    def render_str(self, text: str, **kwargs) -> Text:
        return super().render_str(visible(text), **kwargs)

    def render(self, renderable, options=None):
        if isinstance(renderable, Text):
            renderable = _visible_text(renderable)
        return super().render(renderable, options)
