"""The `medpipe` command as a stranger meets it: a version, one-line usage errors that say
where help is, and help for every option."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import typer

from medpipe import __version__
from medpipe.cli import app

TEXT = {"encoding": "utf-8", "errors": "replace"}  # whatever the locale


def medpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medpipe.cli", *args], capture_output=True,
                          **TEXT, timeout=120)


def test_version():
    result = medpipe("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"medpipe {__version__}"


@pytest.mark.parametrize(("args", "message", "help_of"), [
    (["predict", "-i", "scan.nii.gz"], "Missing option '--model'", "medpipe predict"),
    (["verfy"], "No such command 'verfy'. Did you mean 'verify'?", "medpipe"),
    (["verify"], "Missing argument 'dataset'", "medpipe verify"),
    (["plan", "f.json", "-o", "p.json", "--gpu-memory-gb", "lots"],
     "Invalid value for '--gpu-memory-gb'", "medpipe plan"),
    (["split", "data", "--folds=many"], "(got 'many')", "medpipe split"),
])
def test_a_usage_error_is_one_line_naming_the_help(args, message, help_of):
    result = medpipe(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and f"`{help_of} --help`" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_every_command_and_option_has_help():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert command.help or command.short_help, f"command {name} has no help"
        for param in command.params:
            assert (getattr(param, "help", None) or "").strip(" ."), \
                f"{name} {param.name} has no help text"


def broken_sentences(text: str, width: int = 80) -> list[tuple[str, str]]:
    """Line pairs where a help text's sentence goes on to the next line although its next
    word would have fitted: a hard break carried over from a docstring, not the wrapping.
    A row continues a cell when it is blank before that cell's column; wrapped text fills
    each line as far as the cell's right edge (the panel border, less its padding)."""
    found = []
    lines = text.splitlines()
    for first, second in itertools.pairwise(lines):
        border = second.rfind("│")
        limit = border - 1 if border > 0 else width - 1
        start = len(second) - len(second.lstrip(" │"))
        rest = second[start:limit].strip()
        if not rest or second[:start].strip(" │") or len(first) <= start:
            continue
        before = first[start:limit].rstrip()
        word = rest.split(" ")[0]
        if not before or before[-1] in ".:;!?]" or word.startswith("["):
            continue  # a sentence's end, or Typer's [default: ...] on its own line
        if len(before) + 1 + len(word) <= limit - start:
            found.append((before, rest))
    return found


def test_help_reads_as_paragraphs_and_flags_show_no_type():
    from typer.testing import CliRunner

    runner = CliRunner()
    group = typer.main.get_command(app)
    panel = f"│ {'a sentence':<30} │\n│ {'broken here.':<30} │"  # the check can fail
    assert broken_sentences(panel) == [("a sentence", "broken here.")]
    for name in [None, *group.commands]:
        result = runner.invoke(app, [name, "--help"] if name else ["--help"],
                               env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, result.output
        assert max(map(len, result.output.splitlines())) <= 80
        assert broken_sentences(result.output) == [], (name, result.output)
        assert "<bool>" not in result.output, (name, result.output)


def test_compare_without_a_store_says_so_and_creates_none(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    compare = [sys.executable, "-m", "medpipe.cli", "compare", "--experiment", "x"]
    result = subprocess.run(compare, capture_output=True, **TEXT, timeout=120, cwd=tmp_path,
                            env=env)
    assert result.returncode == 2 and "say where the runs were tracked" in result.stderr
    result = subprocess.run([*compare, "--tracking-uri", "sqlite:///mlflow.db"],
                            capture_output=True, **TEXT, timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 2 and "no MLflow store here" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_help_imports_no_heavy_library():
    """`medpipe --help` (and every command's) needs neither torch, MONAI, SimpleITK, nibabel
    nor MLflow: help is instant, and a machine without them can still be asked."""
    heavy = ("torch", "monai", "SimpleITK", "nibabel", "mlflow", "scipy")
    code = ("import sys; from typer.testing import CliRunner; from medpipe.cli import app; "
            "runner = CliRunner(); "
            "[runner.invoke(app, [*c, '--help']) for c in ([], ['predict'], ['train-seg'])]; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, **TEXT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
