"""The "## Files" table of docs/architecture.md names every module of src/sazd, and only real ones.

A module is linked by its file, ``[runtime/wire.py](../src/sazd/runtime/wire.py)``; a package's
``__init__.py`` may instead be linked by its folder, ``[measure/](../src/sazd/measure/)``. A folder
link stands for that ``__init__.py`` alone, not for the modules inside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
SRC = ROOT / "src" / "sazd"
PREFIX = "../src/sazd/"
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]*)\)")


def files_table(doc: str) -> str:
    """The lines of the "## Files" section that are table rows."""
    section = doc.split("\n## Files\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def links(table: str) -> list[tuple[str, str]]:
    """(shown text without markdown escapes, target) of every link in the table."""
    return [(text.replace("\\", ""), target) for text, target in LINK.findall(table)]


def modules() -> set[str]:
    """Every .py file under src/sazd, relative to it."""
    return {path.relative_to(SRC).as_posix() for path in SRC.rglob("*.py")}


def covered(table: str) -> set[str]:
    """The modules the table links: a file link names its file, a folder link its ``__init__.py``."""
    names = set()
    for _, target in links(table):
        name = target.removeprefix(PREFIX)
        names.add(name + "__init__.py" if name.endswith("/") else name)
    return names


def test_every_module_has_a_row():
    missing = sorted(modules() - covered(files_table(DOC.read_text())))
    assert not missing, (f"docs/architecture.md, ## Files: no row links {missing}; add each as "
                         f"[path]({PREFIX}path) with its one-line purpose")


def test_every_link_names_a_real_module_or_package_once():
    table = files_table(DOC.read_text())
    found = links(table)
    assert len(found) >= len(modules()) // 2  # the table was parsed, not skipped
    targets = [target for _, target in found]
    assert len(targets) == len(set(targets)), "a module is linked twice; keep it in one row"
    for text, target in found:
        assert target.startswith(PREFIX), f"{target}: link modules as {PREFIX}path"
        path = (DOC.parent / target).resolve()
        name = target.removeprefix(PREFIX)
        assert text == name, f"[{text}]({target}): show the path the link points to, [{name}]"
        if target.endswith("/"):
            assert (path / "__init__.py").is_file(), f"{target}: not a package of src/sazd"
        else:
            assert name.endswith(".py") and path.is_file(), f"{target}: no such module"


def test_a_module_without_a_row_is_reported():
    table = files_table(DOC.read_text())
    assert "runtime/wire.py" not in covered(table.replace("(../src/sazd/runtime/wire.py)", "(x)"))
    # A package's folder link covers its __init__.py only, never the modules inside it.
    folder_only = "| measuring | [measure/](../src/sazd/measure/) | the library |"
    assert covered(folder_only) == {"measure/__init__.py"}
    assert "measure/timing.py" in modules() - covered(folder_only)
