"""The shape of the code that keeps it easy to change, checked.

- ``server/`` (the coordinator) and ``client/`` (a site) import neither each other nor
  ``simulations/``: everything they share is in ``common/``, the messages in
  ``common/protocol.py``.
- No protocol string is written twice: every record name, config and metric key and
  status is defined once, in ``common/protocol.py``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Modules imported by a file, as dotted names relative to the project root."""
    tree = ast.parse(path.read_text())
    package = path.parent.relative_to(ROOT).parts
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                out.add(".".join((*base, node.module or "")).strip("."))
            elif node.module:
                out.add(node.module)
    return out


def test_coordinator_and_site_share_only_common() -> None:
    for side, others in (("server", ("client", "simulations")),
                         ("client", ("server", "simulations"))):
        for path in sorted((ROOT / side).glob("*.py")):
            for module in _imports(path):
                parts = module.removeprefix("fedsynth.").split(".")
                assert parts[0] not in others, f"{path.relative_to(ROOT)} imports {module}"


def test_protocol_strings_are_written_once() -> None:
    """Every key and status of the protocol appears as a string literal only in
    common/protocol.py, never in server/ or client/ code (docstrings aside).

    Single words that are also ordinary keys of the summary and of Python dicts
    ("epsilon", "status", "name") are left out: they say nothing about the protocol
    where they appear. Every hyphenated key and every multi-word status is checked."""
    proto = (ROOT / "common" / "protocol.py").read_text()
    values = {v for v in re.findall(r'^\s*[A-Z_]+ = "([a-z][a-z-]*)"', proto, re.M)
              if "-" in v or v in ("trained", "evaluated")}
    assert {"num-examples", "epsilon-budget", "trained", "schema-fingerprint"} <= values
    for side in ("server", "client"):
        for path in sorted((ROOT / side).glob("*.py")):
            tree = ast.parse(path.read_text())
            docstrings = {
                id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef)
                and n.body and isinstance(n.body[0], ast.Expr)
                and isinstance(n.body[0].value, ast.Constant)
            }
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and id(node) not in docstrings):
                    assert node.value not in values, (
                        f"{path.relative_to(ROOT)}:{node.lineno} writes the protocol string "
                        f"{node.value!r}; use common/protocol.py's name for it"
                    )


def test_no_long_functions() -> None:
    """No function of the coordinator or a site runs over 80 lines: each step of a
    study has a name a maintainer can find."""
    for side in ("server", "client"):
        for path in sorted((ROOT / side).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                    assert length <= 80, f"{path.relative_to(ROOT)}:{node.name} has {length}"
