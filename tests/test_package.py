"""The package as a user installs it: license, one version, type hints, declared dependencies.

(a) LICENSE holds the MIT text that README.md and pyproject.toml name.
(b) ``decomp.__version__`` and ``optim.__version__`` are the version pyproject.toml builds with
    (read, as setuptools reads it, from decomp/_version.py) and the installed metadata's.
(c) Both packages carry a PEP 561 ``py.typed`` marker and pyproject ships it as package data.
(d) Every import in decomp/ and optim/ -- lazy ones inside functions included -- is the standard
    library, the project itself, a runtime dependency, or a package of a user-facing extra
    (anything but the ``test``/``bench``/``docs`` extras), and every runtime dependency is
    imported; ``import`` of every library module that does not itself need such an extra works
    with the packages of every extra hidden.
(e) What the tests, the docs' code blocks, the benchmarks and the demo import is declared in the
    extras that ``make test``/``make bench``/``make demo`` install.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import decomp
import optim

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
LIBRARY_PACKAGES = ("decomp", "optim")
LOCAL_PACKAGES = {*LIBRARY_PACKAGES, "tests", "benchmarks"}
# Extras for working on the project, which the library itself must never need.
DEVELOPMENT_EXTRAS = {"test", "bench", "docs"}


def normalized(name: str) -> str:
    """A distribution name in its PEP 503 form, so ``scikit_learn`` and ``Scikit-Learn`` agree."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    """The distribution names of PEP 508 requirement strings (versions, extras, markers dropped)."""
    name = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
    return {normalized(name.match(line.strip()).group()) for line in requirements}


RUNTIME = requirement_names(PROJECT["dependencies"])
EXTRAS = {
    extra: requirement_names(names) for extra, names in PROJECT.get("optional-dependencies", {}).items()
}
USER_EXTRAS = set().union(
    *(names for extra, names in EXTRAS.items() if extra not in DEVELOPMENT_EXTRAS)
)
MODULE_DISTRIBUTIONS = importlib.metadata.packages_distributions()
DYNAMIC_IMPORTS = ("import_module", "__import__")


def distribution(module: str) -> str:
    """The distribution that provides top-level ``module``; its own name where none is installed."""
    providers = MODULE_DISTRIBUTIONS.get(module)
    return normalized(providers[0] if providers else module)


def imported_modules(
    source: str, filename: str = "<source>", *, top_level_only: bool = False
) -> set[str]:
    """Top-level names of the absolute imports in ``source``.

    Imports anywhere count (inside functions, ``try`` blocks, ``TYPE_CHECKING``), and so do
    ``importlib.import_module("...")``/``__import__("...")`` with a literal name; with
    ``top_level_only`` only the statements the module runs when it is imported (module body,
    including its ``if``/``try`` blocks, not function or class bodies) count.
    """
    tree = ast.parse(source, filename)
    if top_level_only:
        nodes, stack = [], list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            nodes.append(node)
            stack.extend(ast.iter_child_nodes(node))
    else:
        nodes = list(ast.walk(tree))
    modules = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in DYNAMIC_IMPORTS
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            modules.add(node.args[0].value)
    return {module.partition(".")[0] for module in modules}


def third_party(modules: set[str]) -> set[str]:
    return {
        module
        for module in modules
        if module not in sys.stdlib_module_names and module not in LOCAL_PACKAGES
    }


def library_sources() -> dict[str, str]:
    return {
        path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
        for package in LIBRARY_PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def undeclared_library_imports(sources: dict[str, str]) -> list[str]:
    """``"file: module (distribution)"`` for each import the library may not make."""
    allowed = RUNTIME | USER_EXTRAS
    return [
        f"{filename}: {module} ({distribution(module)})"
        for filename, source in sources.items()
        for module in sorted(third_party(imported_modules(source, filename)))
        if distribution(module) not in allowed
    ]


# (a) ------------------------------------------------------------------------------------------


def test_license_is_the_mit_text_the_metadata_names():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the decomp-optim authors" in text
    assert "Permission is hereby granted, free of charge" in text
    assert PROJECT["license"] == "MIT"
    assert "LICENSE" in PROJECT["license-files"]
    assert "## License\n\nMIT" in (ROOT / "README.md").read_text(encoding="utf-8")


# (b) ------------------------------------------------------------------------------------------


def built_version() -> str:
    """The version setuptools builds with: the literal that pyproject's ``attr`` points at."""
    assert "version" in PROJECT.get("dynamic", []) and "version" not in PROJECT, (
        "pyproject.toml must take its version from decomp/_version.py, not state a second one"
    )
    module, _, name = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"].rpartition(".")
    path = ROOT / (module.replace(".", "/") + ".py")
    # setuptools reads the attribute without importing the package when it is a literal
    # assignment; anything else would make every build import torch.
    for statement in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(statement, ast.Assign) and [target.id for target in statement.targets] == [name]:
            assert isinstance(statement.value, ast.Constant), f"{path.name}: {name} must be a string literal"
            return statement.value.value
    raise AssertionError(f"{path} assigns no {name}")


def test_one_version_for_pyproject_decomp_and_optim():
    version = built_version()
    # PEP 440's public version scheme (no local part: this is what goes on an index).
    assert re.fullmatch(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", version), version
    assert decomp.__version__ == version
    assert optim.__version__ == version
    assert "__version__" not in decomp.__all__  # __all__ lists the functions the docs cover


def test_installed_metadata_reports_the_same_version():
    try:
        installed = importlib.metadata.distribution(PROJECT["name"])
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{PROJECT['name']} is imported from the source tree, not installed")
    assert installed.version == decomp.__version__, (
        f"installed metadata says {installed.version}, decomp/_version.py says {decomp.__version__}: "
        f"reinstall ({sys.executable} -m pip install -e .)"
    )


# (c) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("package", LIBRARY_PACKAGES)
def test_package_ships_its_type_hints(package: str):
    assert (ROOT / package / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"][package]


# (d) ------------------------------------------------------------------------------------------


def test_library_imports_only_declared_dependencies():
    assert undeclared_library_imports(library_sources()) == []


def test_every_runtime_dependency_is_imported_by_the_library():
    imported = {
        distribution(module)
        for source in library_sources().values()
        for module in third_party(imported_modules(source))
    }
    assert RUNTIME - imported == set(), "runtime dependencies the library never imports belong in an extra"


@pytest.mark.parametrize(
    "source",
    [
        "import scipy.linalg\n",
        "from tensorly.decomposition import tucker\n",
        "def lazy():\n    import scipy\n",
        "try:\n    import sklearn\nexcept ImportError:\n    sklearn = None\n",
        "import importlib\nfft = importlib.import_module('scipy.fft')\n",
    ],
    ids=["module", "from", "lazy", "guarded", "import_module"],
)
def test_an_undeclared_import_is_caught(source: str):
    # scipy, tensorly and scikit-learn are test/bench oracles: the library may not use them.
    (problem,) = undeclared_library_imports({"decomp/new.py": source})
    assert problem.startswith("decomp/new.py: ")


def test_the_library_imports_without_any_extra():
    extra_only = set().union(*EXTRAS.values()) - RUNTIME
    hidden = sorted(
        module
        for module, providers in MODULE_DISTRIBUTIONS.items()
        if module not in sys.stdlib_module_names
        and {normalized(name) for name in providers} <= extra_only
    )
    # An integration module (one that imports a user-facing extra when it is imported) needs that
    # extra by design; every other module must import without it.
    optional = USER_EXTRAS - RUNTIME
    modules = sorted(
        ".".join(Path(filename).with_suffix("").parts).removesuffix(".__init__")
        for filename, source in library_sources().items()
        if not {distribution(module) for module in imported_modules(source, top_level_only=True)} & optional
    )
    script = textwrap.dedent(
        f"""
        import importlib, sys

        # None in sys.modules is how the import system spells "not installed": import raises
        # ModuleNotFoundError and importlib.util.find_spec returns None.
        sys.modules.update(dict.fromkeys({hidden!r}))
        for module in {modules!r}:
            importlib.import_module(module)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


# (e) ------------------------------------------------------------------------------------------


def python_sources(*folders: str) -> dict[str, str]:
    return {
        path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
        for folder in folders
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


def documentation_blocks() -> dict[str, str]:
    """The ```python blocks of README.md and docs/, which tests/test_docs.py runs."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    fence = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return {
        f"{page.relative_to(ROOT).as_posix()} block {number}": match.group(1)
        for page in pages
        for number, match in enumerate(fence.finditer(page.read_text(encoding="utf-8")), start=1)
    }


@pytest.mark.parametrize(
    ("what", "extras"),
    [
        ("tests, conftest.py and the docs' code blocks", ["test"]),
        ("benchmarks and examples", ["bench", "test"]),
    ],
    ids=["test", "bench"],
)
def test_tests_benchmarks_and_examples_get_their_packages_from_the_extras(what: str, extras: list[str]):
    # make test installs the test extra; make bench and make demo install bench and test.
    if extras == ["test"]:
        sources = {**python_sources("tests"), **documentation_blocks()}
        sources["conftest.py"] = (ROOT / "conftest.py").read_text(encoding="utf-8")
    else:
        sources = python_sources("benchmarks", "examples")
    declared = RUNTIME.union(*(EXTRAS[extra] for extra in extras))
    undeclared = [
        f"{filename}: {module} ({distribution(module)})"
        for filename, source in sources.items()
        for module in sorted(third_party(imported_modules(source, filename)))
        if distribution(module) not in declared
    ]
    extras_named = " and ".join(extras)
    assert undeclared == [], f"{what} import packages that the {extras_named} extras do not declare"


def test_make_docs_installs_exactly_the_docs_extra():
    # make docs installs its tools without the package (so without torch): the list in the
    # Makefile must be pyproject's docs extra.
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    line = re.search(r"^DOCS_TOOLS := (.*)$", makefile, re.MULTILINE)
    assert line is not None, "Makefile lost its DOCS_TOOLS line"
    assert re.findall(r'"([^"]+)"', line.group(1)) == PROJECT["optional-dependencies"]["docs"]
