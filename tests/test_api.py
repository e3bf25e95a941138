"""The public Python API (`import fedsynth`), the README's example and a quick CLI.

The README's Python example is run exactly as written (from a folder where the
bundled data sits at the path it names): a real federated study through the real
ServerApp and ClientApp, in this process.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO

README = REPO / "README.md"


def readme_example() -> str:
    text = README.read_text()
    marker = text.index("<!-- readme-example:")
    block = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert block, "the README's Python example is missing"
    return block.group(1)


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (tmp_path / "simulations").symlink_to(REPO / "simulations")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)  # noqa: S102
    result = scope["result"]
    assert set(result.privacy) == {"cleveland", "hungarian", "va"}
    va = result.privacy["va"]
    assert va["epsilon_budget"] == 2.0 and va["delta"] == 1e-5
    assert 0 < va["epsilon_spent"] <= 2.0 and va["rounds_trained"] == 2
    assert len(result.rounds) == 2
    assert list(result.synthetic.columns) == result.model.schema.names
    assert len(scope["more"]) == 100
    assert result.verdict.areas and result.validation.metrics
    assert (tmp_path / "my-study" / "my-model.fsg").is_file()
    assert "judged areas" in capsys.readouterr().out


def test_public_names_resolve_lazily() -> None:
    code = ("import sys, fedsynth; assert 'torch' not in sys.modules; "
            "names = [getattr(fedsynth, n) for n in fedsynth.__all__]; "
            "assert fedsynth.TVAE.name == 'tvae'; print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert int(out.stdout) >= 15


def test_cli_names_match_the_registries() -> None:
    from fedsynth import cli
    from fedsynth.common.generators import REGISTRY
    from fedsynth.simulations.engines import DEFAULT_ENGINE, ENGINES

    assert tuple(sorted(REGISTRY)) == cli.GENERATORS
    assert cli.ENGINES == ENGINES and cli.ENGINES[0] == DEFAULT_ENGINE


def test_help_and_argument_errors_answer_quickly() -> None:
    """`fedsynth --help` and a bad argument import neither torch nor Flower."""
    exe = Path(sys.executable).with_name("fedsynth")
    for argv, code in ((["--help"], 0), (["simulate", "--rounds", "x"], 2),
                       (["simulate", "--help"], 0)):
        start = time.perf_counter()
        done = subprocess.run([str(exe), *argv], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        assert done.returncode == code, done.stderr
        assert seconds < 2.0, f"{argv}: {seconds:.2f} s"  # was 4-6 s with eager imports
    code = ("import sys; from fedsynth.cli import build_parser; build_parser(); "
            "assert not {'torch', 'flwr', 'opacus'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
