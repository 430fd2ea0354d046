"""The documentation is executable, so it cannot drift from the code without a test failing.

(a) Every ```python block of README.md and docs/**/*.md runs in a fresh namespace (docs/benchmarks.md
    is written by the benchmark script and is skipped).
(b) Every row of the tables in docs/errors.md is a literal call, an exception type and a message
    fragment (evaluated with the public names of decomp, decomp.adapters and optim in scope); the
    call must raise exactly that type with that fragment in its message, and every public
    function of decomp has rows.
(c) The signature line at the top of each page matches the function's real signature, defaults
    included, and every page is in the mkdocs nav.
(d) examples/decompose.py, the demo behind ``make demo``, runs end to end on a tiny network.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import decomp
import decomp.adapters
import optim

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATED_PAGES = {"benchmarks.md"}
PAGES_NEEDING_EXAMPLES = ["README.md"] + [
    f"docs/{name}.md" for name in ("index", "rsvd", "tucker", "kpsvd", "ldu", "atoms", "dct")
]


class CodeBlock(NamedTuple):
    source: str
    location: str  # "page:line" of the block's first line of code


def code_blocks(page: Path) -> list[CodeBlock]:
    text = page.read_text(encoding="utf-8")
    fence = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
    blocks = []
    for match in fence.finditer(text):
        first_code_line = text.count("\n", 0, match.start()) + 2
        blocks.append(CodeBlock(match.group(1), f"{page.relative_to(ROOT)}:{first_code_line}"))
    return blocks


DOCUMENTED_PAGES = [ROOT / "README.md"] + sorted(
    page for page in DOCS.rglob("*.md") if page.name not in GENERATED_PAGES
)
CODE_BLOCKS = [block for page in DOCUMENTED_PAGES for block in code_blocks(page)]


@pytest.mark.parametrize("page", PAGES_NEEDING_EXAMPLES)
def test_page_has_a_runnable_example(page: str):
    assert code_blocks(ROOT / page), f"{page} has no ```python example"


@pytest.mark.parametrize("block", CODE_BLOCKS, ids=[block.location for block in CODE_BLOCKS])
def test_code_block_runs(block: CodeBlock):
    # Compiling with the page location as file name makes a traceback point into the page.
    exec(compile(block.source, block.location, "exec"), {"__name__": "__docs__"})


SIGNATURE_LINE = re.compile(r"^`(?P<name>[a-z_]+)\((?P<parameters>.*)\) -> [^`]+`,?$")


def page_name(page: Path) -> str:
    return page.relative_to(DOCS).as_posix() if page.is_relative_to(DOCS) else page.name


def documented_signatures() -> list[tuple[str, str, str]]:
    """``(page, function, parameter list)`` for each page's leading signature lines."""
    return [
        (page_name(page), match["name"], match["parameters"])
        for page in DOCUMENTED_PAGES
        for line in page.read_text(encoding="utf-8").splitlines()
        if (match := SIGNATURE_LINE.match(line))
    ]


def documented_object(page: str, function: str):
    """The documented function: from decomp.adapters on the adapters pages, else from decomp."""
    return getattr(decomp.adapters if page.startswith("adapters/") else decomp, function)


def test_every_public_function_has_a_documented_signature():
    documented = {
        function for page, function, _ in documented_signatures() if not page.startswith("adapters/")
    }
    assert documented == {name for name in decomp.__all__ if name[0].islower()}


@pytest.mark.parametrize(("page", "function", "parameters"), documented_signatures())
def test_documented_signature_matches_the_code(page: str, function: str, parameters: str):
    # Parse the documented parameter list as a Python signature and compare names, kinds and
    # defaults, so a changed default (say tucker's tol) cannot leave a stale page behind.
    namespace: dict = {}
    exec(f"def documented({parameters}): pass", namespace)
    documented = inspect.signature(namespace["documented"]).parameters
    actual = inspect.signature(documented_object(page, function)).parameters
    assert list(documented) == list(actual), f"{page}: parameter names differ"
    for name, parameter in actual.items():
        assert documented[name].kind == parameter.kind, f"{page}: {name} keyword-only or not"
        assert documented[name].default == parameter.default, f"{page}: default of {name}"


def test_mkdocs_nav_lists_every_page():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in sorted(DOCS.rglob("*.md")):
        name = page.relative_to(DOCS).as_posix()
        assert re.search(rf":\s*{re.escape(name)}\s*$", nav, re.MULTILINE), (
            f"docs/{name} is not in the mkdocs.yml nav"
        )


# --------------------------------------------------------------------------------------------
# docs/errors.md rows: | `call` | `ExceptionType` | `message fragment` |


class ErrorRow(NamedTuple):
    call: str
    exception: str
    fragment: str


ERROR_ROW = re.compile(
    r"^\|\s*`(?P<call>[^`]+)`\s*\|\s*`(?P<exception>\w+)`\s*\|\s*`(?P<fragment>[^`]+)`\s*\|$"
)
EXCEPTIONS = {"TypeError": TypeError, "ValueError": ValueError}
ERRORS_PAGE = (DOCS / "errors.md").read_text(encoding="utf-8").splitlines()
ERROR_ROWS = [ErrorRow(*match.groups()) for line in ERRORS_PAGE if (match := ERROR_ROW.match(line))]


def test_every_call_row_parses():
    # A row that starts like a call but does not match the pattern would silently go untested.
    call_rows = [line for line in ERRORS_PAGE if line.startswith("| `")]
    unparsed = [line for line in call_rows if not ERROR_ROW.match(line)]
    assert not unparsed and len(call_rows) > 50, unparsed


@pytest.mark.parametrize("function", [name for name in decomp.__all__ if name[0].islower()])
def test_every_public_function_has_error_rows(function: str):
    rows = [row for row in ERROR_ROWS if row.call.startswith(f"{function}(")]
    assert {row.exception for row in rows} >= {"TypeError", "ValueError"}, (
        f"docs/errors.md needs a TypeError and a ValueError row for {function}"
    )


@pytest.mark.parametrize("row", ERROR_ROWS, ids=[row.call for row in ERROR_ROWS])
def test_documented_error_is_raised(row: ErrorRow):
    namespace = {"torch": torch, "decomp": decomp}
    for module in (decomp, decomp.adapters, optim):
        namespace.update({name: getattr(module, name) for name in module.__all__})
    with pytest.raises(EXCEPTIONS[row.exception]) as raised:
        eval(row.call, namespace)
    # pytest.raises also accepts subclasses; the table promises the exact type.
    assert type(raised.value) is EXCEPTIONS[row.exception]
    assert row.fragment in str(raised.value), f"message was: {raised.value}"


# --------------------------------------------------------------------------------------------
# examples/decompose.py


def test_demo_runs_and_reports_every_method(capsys):
    path = ROOT / "examples" / "decompose.py"
    spec = importlib.util.spec_from_file_location("decompose_demo", path)
    demo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo  # dataclasses resolve the module of their annotations here
    try:
        spec.loader.exec_module(demo)
        threads = torch.get_num_threads()
        rows = demo.main(["--train-steps", "2", "--width", "8", "--d-model", "16", "--no-progress"])
        assert torch.get_num_threads() == threads, "the demo must restore torch's thread count"
    finally:
        del sys.modules[spec.name]
    printed = capsys.readouterr().out
    assert {row.method for row in rows} == set(demo.METHODS)
    for method in demo.METHODS:
        summary_row = rf"^{method}\s+\d+\s+[\d.]+%"
        assert re.search(summary_row, printed, re.MULTILINE), f"no summary row for {method}"
    # The energy budget bounds the error of the methods whose truncation error is a spectral tail.
    bound = (1 - 0.95) ** 0.5 + 1e-6
    spectral_tail = ("rsvd", "kpsvd", "atoms", "dct")
    assert all(row.relative_error <= bound for row in rows if row.method in spectral_tail)
    assert all(row.relative_error < 1e-5 for row in rows if row.method == "ldu")
