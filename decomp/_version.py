"""The package version, the single source of truth for ``decomp``, ``optim`` and pyproject.

pyproject.toml reads this literal statically (``[tool.setuptools.dynamic]``), so building the
package never imports torch; keep it a plain string assignment.
"""

__version__ = "0.1.0"
