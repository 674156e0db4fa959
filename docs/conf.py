"""Sphinx configuration of the astra-provider documentation (MyST markdown).

Build:  sphinx-build -W --keep-going -b html docs docs/_build/html   (scripts/test.sh does this)

Autodoc imports the package. ``astra_provider`` itself never imports Airflow; for the modules that do, the
build points Airflow at a throwaway home so that importing them reads and writes nothing of a real Airflow
installation, and the astra database default (``$ASTRA_HOME``) at a throwaway directory too.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_scratch = Path(tempfile.mkdtemp(prefix="astra-docs-"))
atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
os.environ["AIRFLOW_HOME"] = str(_scratch / "airflow")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["ASTRA_HOME"] = str(_scratch / "astra")

# Autodoc reads every attribute of the ORM mixins; SQLAlchemy warns about that, harmlessly.
warnings.filterwarnings("ignore", message="Unmanaged access of declarative attribute")

from astra_provider import __version__  # noqa: E402

project = "astra-provider"
author = "the astra-provider developers"
copyright = "the astra-provider developers"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = False

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autoclass_content = "both"

html_theme = "alabaster"
html_title = f"astra-provider {release}"
html_theme_options = {"description": "Stellar spectroscopy with provenance, on Apache Airflow 3"}


# Docstring sections ---------------------------------------------------------------------------------------
#
# The science modules write numpy-like sections with a short form of parameters, ``name : description`` (no
# type), e.g.
#
#     Parameters
#     ----------
#     flux, ivar : (N, P) normalised flux and inverse variance.
#         continued description
#
# napoleon would read the description as a type. This turns such a section into ``:param name:`` fields
# (one per name) and any other underlined section title into a rubric.

_RULE = re.compile(r"-{3,}\s*$")
_ENTRY = re.compile(r"(?P<names>\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)(?:\s+:\s*(?P<description>.*))?$")
_PARAMETER_SECTIONS = {"Parameters", "Other Parameters", "Keyword Arguments"}


def _sections(app, what, name, obj, options, lines: list[str]) -> None:
    out: list[str] = []
    i = 0
    while i < len(lines):
        title = lines[i].strip()
        is_section = (
            title
            and not lines[i].startswith(" ")
            and i + 1 < len(lines)
            and _RULE.match(lines[i + 1].strip())
            and len(lines[i + 1].strip()) >= len(title)
        )
        if not is_section:
            out.append(lines[i])
            i += 1
            continue
        i += 2
        if title not in _PARAMETER_SECTIONS:
            out += ["", f".. rubric:: {title}", ""]
            continue
        out.append("")
        while i < len(lines):
            line = lines[i]
            if not line.strip():
                i += 1
                continue
            entry = None if line.startswith(" ") else _ENTRY.match(line)
            if entry is None:
                break  # the end of the section: ordinary text follows
            body = [entry["description"] or ""]
            i += 1
            while i < len(lines) and (lines[i].startswith(" ") or not lines[i].strip()):
                if lines[i].strip():
                    body.append(lines[i].strip())
                i += 1
            for parameter in re.split(r"\s*,\s*", entry["names"]):
                out.append(f":param {parameter.lstrip('*')}: {body[0]}")
                out += [f"    {text}" for text in body[1:]]
        out.append("")
    lines[:] = out


def setup(app):
    app.connect("autodoc-process-docstring", _sections)
    return {"parallel_read_safe": True}
