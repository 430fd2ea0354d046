"""The documentation is executable, so it cannot drift from the code without a test failing.

(a) Every ```python block of README.md and docs/**/*.md runs in a fresh namespace (docs/benchmarks.md
    is written by the benchmark script and is skipped).
(b) Every row of the tables in docs/errors.md is a literal call, an exception type and a message
    fragment (evaluated with the public names of decomp, decomp.adapters and optim in scope); the
    call must raise exactly that type with that fragment in its message, and every public
    function of decomp has rows.
(c) The signature line at the top of each page matches the function's real signature, defaults
    included, and every page is in the mkdocs nav.
(d) examples/demo.py (``make demo``) and examples/decompose.py (``make demo-decompose``) run end
    to end on a tiny network and print a row for every method.
(e) The site renders its math without a script or the network: docs/_ext/mathml.py turns the
    math of the pages and of the docstrings into MathML, and mkdocs.yml loads nothing remote.
"""

from __future__ import annotations

import ast
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
# examples/demo.py and examples/decompose.py


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (examples are scripts, not a package)."""
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module of their annotations here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def test_main_demo_runs_and_reports_every_method(capsys, tmp_path):
    demo = load_example("demo")
    try:
        threads = torch.get_num_threads()
        results = demo.main(["--quick", "--no-progress", "--out", str(tmp_path)])
        assert torch.get_num_threads() == threads, "the demo must restore torch's thread count"
    finally:
        del sys.modules[demo.__name__]
    printed = capsys.readouterr().out
    methods = [("pretrain", method) for method in demo.PRETRAIN_METHODS]
    methods += [("fine-tune", method) for method in demo.FINETUNE_METHODS]
    assert [(result.stage, result.method) for result in results] == methods
    for stage, method in methods:
        # stage, method, trainable, optimizer state, lr, test accuracy, test loss, time
        numbers = r"\s+[\d,]+\s+[\d,]+\s+\S+\s+[\d.]+%\s+[\d.]+\s+[\d.]+ s$"
        row = rf"^{stage}\s+{re.escape(method)}{numbers}"
        assert re.search(row, printed, re.MULTILINE), f"no summary row for {stage} {method}"
    by_method = {result.method: result for result in results}
    # Projection is the point of DCTProjectedAdam: it must hold less state than AdamW.
    assert by_method["DCTProjectedAdam"].state_numbers < by_method["AdamW"].state_numbers
    assert by_method["DCTProjectedAdam"].trainable == by_method["AdamW"].trainable
    # The adapters train far fewer numbers than the network; head only trains just the head.
    full = by_method["full fine-tuning"].trainable
    assert all(by_method[name].trainable < full for name in ("AtomParam", "peft LoRA r=1"))
    head = demo.SmallResNet(num_classes=demo.CLASSES, width=demo.QUICK["width"]).head
    assert by_method["head only"].trainable == sum(p.numel() for p in head.parameters())
    plot = tmp_path / "demo.png"
    assert plot.read_bytes().startswith(b"\x89PNG"), "the demo must save its plot"
    assert str(plot.resolve()) in printed


def test_main_demo_trains_the_new_head_at_its_own_rate():
    """Regression (issue 12, as in the adapters benchmark): the demo trained the head at the
    adapter's rate, so AtomParam (lr 1e-3) scored 67.0% against head only's 80.4%; with the head
    at its own rate it scores 85.5%."""
    demo = load_example("demo")
    try:
        for method in demo.FINETUNE_METHODS:
            torch.manual_seed(0)
            model = demo.PREPARE[method](demo.SmallResNet(num_classes=demo.CLASSES, width=demo.QUICK["width"]))
            opt = demo.fine_tuning_optimizer(model, lr=1e-3, head_lr=demo.HEAD_LR)
            head_group, *body_groups = opt.param_groups
            # the head as the model holds it: peft trains its modules_to_save copy
            network = model.base_model.model if hasattr(model, "base_model") else model
            head = network.get_submodule(demo.HEAD)
            head = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head
            assert head_group["lr"] == demo.HEAD_LR, method
            assert {id(p) for p in head_group["params"]} == {id(p) for p in head.parameters()}, method
            assert all(group["lr"] == 1e-3 for group in body_groups)
            body = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in head.parameters())]
            assert {id(p) for group in body_groups for p in group["params"]} == {id(p) for p in body}, method
            assert bool(body_groups) == (method != "head only"), method
    finally:
        del sys.modules[demo.__name__]


def test_decompose_demo_runs_and_reports_every_method(capsys):
    demo = load_example("decompose")
    try:
        threads = torch.get_num_threads()
        rows = demo.main(["--train-steps", "2", "--width", "8", "--d-model", "16", "--no-progress"])
        assert torch.get_num_threads() == threads, "the demo must restore torch's thread count"
    finally:
        del sys.modules[demo.__name__]
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


# --------------------------------------------------------------------------------------------
# Math without a script: docs/_ext/mathml.py (the docs tools are the docs extra, not the test
# extra, so these tests run where they are installed, as in the repository's .venv)

MKDOCS = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")


def load_docs_extension(name: str):
    """Import ``docs/_ext/<name>.py``, which mkdocs loads by path."""
    spec = importlib.util.spec_from_file_location(f"docs_ext_{name}", DOCS / "_ext" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wide_tables_scroll_sideways():
    stylesheets = re.search(r"^extra_css:\n((?:[ \t]+-.*\n)*)", MKDOCS, re.MULTILINE)
    assert stylesheets, "mkdocs.yml has no extra_css"
    paths = re.findall(r"-\s*(\S+)", stylesheets.group(1))
    css = "".join((DOCS / path).read_text(encoding="utf-8") for path in paths)  # each must exist
    table_rules = re.findall(r"table[^{,]*\{([^}]*)\}", css)
    assert any("overflow-x: auto" in rule and "max-width: 100%" in rule for rule in table_rules)


@pytest.fixture(scope="module")
def site_markdown():
    """``(to_html, convert_docstring)``: a page's HTML as the site builds it; rst_math's rewrite."""
    pytest.importorskip("latex2mathml")
    pytest.importorskip("pymdownx")
    pytest.importorskip("griffe")
    markdown = pytest.importorskip("markdown")

    mathml = load_docs_extension("mathml")
    rst_math = load_docs_extension("rst_math")
    # The extensions of mkdocs.yml that touch math, tables and code; arithmatex as configured there.
    converter = markdown.Markdown(
        extensions=["tables", "pymdownx.arithmatex", "pymdownx.highlight", "pymdownx.superfences"],
        extension_configs={"pymdownx.arithmatex": {"generic": True}},
    )

    def to_html(text: str) -> str:
        converter.reset()
        return mathml.render_math(converter.convert(text))

    return to_html, rst_math.convert


def test_mkdocs_loads_no_script_from_the_network():
    scripts = re.search(r"^extra_javascript:\n((?:[ \t]+-.*\n)*)", MKDOCS, re.MULTILINE)
    remote = re.findall(r"https?://\S+", scripts.group(1)) if scripts else []
    assert remote == [], f"mkdocs.yml loads scripts from the network: {remote}"
    assert not re.search(r"mathjax|katex", MKDOCS, re.IGNORECASE)
    # The hook renders what arithmatex's generic mode wraps, so both must stay configured.
    assert re.search(r"^hooks:\n[ \t]+- docs/_ext/mathml\.py$", MKDOCS, re.MULTILINE)
    assert re.search(r"- pymdownx\.arithmatex:\n[ \t]+generic: true$", MKDOCS, re.MULTILINE)


def test_math_of_pages_and_docstrings_becomes_mathml(site_markdown):
    to_html, convert_docstring = site_markdown
    docstring = convert_docstring(
        "The rank :math:`r` and\n\n.. math::\n\n    W' = W + \\Delta W\n\nend."
    )
    page = "\n\n".join(
        [
            "Dollars $a < b$ and round \\(x_i^2\\), and `code $kept$`.",
            "$$\n\\sum_{i<n} \\alpha_i\n$$",
            "\\[ \\lVert A \\rVert_F \\]",
            "| method | budget |\n|---|---|\n| LoRA | \\(r(m + n)\\) |",
            docstring,
        ]
    )
    html = to_html(page)
    assert html.count("<math ") == 7
    assert html.count('display="block"') == 3
    assert not re.search(r"\\\(|\\\)|\\\[|\\\]|\$\$", html), html
    assert "<code>code $kept$</code>" in html  # code spans are not math
    assert "&lt;" in html or "&#x0003C;" in html  # the escaped "<" reached MathML as "<"


def test_every_formula_of_the_site_translates(site_markdown):
    # A formula latex2mathml cannot translate raises in the hook (and so fails `make docs`);
    # this finds it without a build, in every page and every docstring mkdocstrings may render.
    to_html, convert_docstring = site_markdown
    texts = {
        page.relative_to(ROOT).as_posix(): page.read_text(encoding="utf-8")
        for page in DOCUMENTED_PAGES
    }
    for source in sorted([*(ROOT / "decomp").rglob("*.py"), *(ROOT / "optim").rglob("*.py")]):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    name = getattr(node, "name", "module")
                    texts[f"{source.relative_to(ROOT).as_posix()}:{name}"] = (
                        convert_docstring(docstring)
                    )
    formulas = 0
    for where, text in texts.items():
        html = to_html(text)
        formulas += html.count("<math ")
        assert not re.search(r'class="arithmatex">\\[(\[]', html), f"raw TeX left in {where}"
    assert formulas > 500  # the site's formulas were found at all


@pytest.mark.parametrize(
    ("tex", "expected"),
    [
        # latex2mathml 3.81 leaves these as TeX text; the hook repairs them.
        ("\\Big\\lVert A \\Big\\rVert_F", "&#x02016;"),
        ("\\text{kernel\\_scale} \\cdot s", "<mtext>kernel_scale</mtext>"),
        ("a \\in A,\\\nb \\in B", "<mtext>&#x000A0;</mtext>"),
    ],
)
def test_mathml_repairs_what_latex2mathml_leaves_as_tex(tex: str, expected: str):
    pytest.importorskip("latex2mathml")
    mathml = load_docs_extension("mathml").to_mathml(tex, display=False)
    assert expected in mathml and "\\" not in mathml, mathml


def test_untranslatable_math_fails_the_build():
    pytest.importorskip("latex2mathml")
    with pytest.raises(ValueError, match="cannot translate"):
        load_docs_extension("mathml").to_mathml("\\notacommand{x}", display=True)


SOURCE_DIRS = ("decomp", "optim", "benchmarks", "examples", "tests")


def test_no_string_holds_a_control_character_from_an_unescaped_backslash():
    r"""A docstring with math must be raw: unless it is, ``\beta`` starts with a backspace and
    ``W^\top`` renders as ``W^``, a TAB, ``op``, with no warning at import (``\t``, ``\b``,
    ``\f``, ``\a``, ``\v``, ``\r`` are valid escapes). Regression: three docstrings of ``optim``."""
    control = re.compile(r"[\t\b\f\a\v\r]")  # in a class, \b is the backspace
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for directory in SOURCE_DIRS
        for path in sorted((ROOT / directory).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and control.search(node.value)
    ]
    assert found == [], f"strings with a control character (write them as raw strings): {found}"
