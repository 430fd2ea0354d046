"""mkdocs hook: render the site's math as MathML at build time, so pages need no script or network.

``pymdownx.arithmatex`` (generic mode) finds the math of the Markdown pages (``$...$``,
``$$...$$``, ``\\(...\\)``, ``\\[...\\]``) and of the docstrings (whose ``:math:`` roles and
``.. math::`` blocks ``rst_math.py`` rewrites as ``\\(...\\)`` and ``\\[...\\]``), and wraps each
piece as ``<span class="arithmatex">\\(...\\)</span>`` or
``<div class="arithmatex">\\[...\\]</div>``, with its TeX HTML-escaped. This hook replaces
the delimited TeX in every such wrapper of the rendered page by the MathML that ``latex2mathml``
makes of it; browsers render MathML natively.
A TeX command that latex2mathml does not know would be left in the output as text, so the hook
raises instead and the build stops, naming the expression.
"""

from __future__ import annotations

import re
from html import unescape

from latex2mathml.converter import convert as latex_to_mathml

_ARITHMATEX = re.compile(
    r'<span class="arithmatex">\\\((?P<inline>.*?)\\\)</span>'
    r'|<div class="arithmatex">\\\[(?P<block>.*?)\\\]</div>',
    re.DOTALL,
)
# latex2mathml 3.81 leaves three things as TeX source: a backslash that ends a line (a control
# space to TeX, so it is rewritten as ``\ `` before conversion), the delimiter of a sized
# delimiter (``\Big\lVert`` gives ``<mo ...>\lVert</mo>``) and escaped characters inside
# ``\text{}`` and ``\texttt{}`` (``kernel\_scale``); the last two are repaired in the MathML.
_LINE_BREAK_OR_CONTROL_NEWLINE = re.compile(r"(\\\\)|\\\n")
_SIZED_DELIMITER = re.compile(r"(<mo [^>]*>)(\\(?:[A-Za-z]+|[|{}]))(</mo>)")
_SYMBOL = re.compile(r"<m[io][^>]*>([^<]+)</m[io]>")
_TEXT = re.compile(r"(<mtext[^>]*>)([^<]*)(</mtext>)")
_TEXT_ESCAPE = re.compile(r"\\([_%&#$ {}])")
# A backslash still in the MathML text is a TeX command latex2mathml did not translate.
_UNTRANSLATED = re.compile(r">[^<]*\\[^<]*<")


def _delimiter_symbol(match: re.Match[str]) -> str:
    opening, command, closing = match.groups()
    symbol = _SYMBOL.search(latex_to_mathml(command))
    return opening + (symbol.group(1) if symbol else command) + closing


def _unescape_text(match: re.Match[str]) -> str:
    opening, text, closing = match.groups()
    return opening + _TEXT_ESCAPE.sub(r"\1", text) + closing


def to_mathml(tex: str, *, display: bool) -> str:
    """The MathML of one TeX expression (``display``: a block of its own, else inline).

    Raises:
        ValueError: the expression holds a command latex2mathml cannot translate.

    Example:
        >>> to_mathml("x_i", display=False)  # doctest: +ELLIPSIS
        '<math ... display="inline"><mrow><msub><mi>x</mi><mi>i</mi></msub></mrow></math>'
    """
    # ``\\`` pairs are matched first, so only a lone backslash before a newline is rewritten.
    tex = _LINE_BREAK_OR_CONTROL_NEWLINE.sub(lambda match: match.group(1) or "\\ ", tex.strip())
    mathml = latex_to_mathml(tex, display="block" if display else "inline")
    mathml = _TEXT.sub(_unescape_text, _SIZED_DELIMITER.sub(_delimiter_symbol, mathml))
    if _UNTRANSLATED.search(mathml):
        raise ValueError(f"latex2mathml cannot translate a command of the math {tex!r}")
    return mathml


def render_math(page_html: str) -> str:
    """Replace the TeX in every arithmatex wrapper of ``page_html`` by its MathML.

    The wrappers stay, so the stylesheet can let a long display formula scroll.
    """

    def replace(match: re.Match[str]) -> str:
        inline = match.group("inline")
        if inline is not None:
            return f'<span class="arithmatex">{to_mathml(unescape(inline), display=False)}</span>'
        block = to_mathml(unescape(match.group("block")), display=True)
        return f'<div class="arithmatex">{block}</div>'

    return _ARITHMATEX.sub(replace, page_html)


def on_page_content(html: str, **kwargs: object) -> str:
    """The mkdocs event: the page's HTML, after Markdown and mkdocstrings, before the theme."""
    return render_math(html)
