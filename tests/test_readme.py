"""The README's commands work as written: every `medpipe` command and option it shows exists,
every `snakemake` command plans its DAG (dry run) from the repository's own configs, every
`make` target exists, and every Python snippet names only what it imports or defines."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from medpipe.data.demo import DemoSettings, build_demo_dataset

TEXT = {"encoding": "utf-8", "errors": "replace"}  # whatever the locale

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    """Each shell line of the README (continuations joined, comments dropped)."""
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                lines.append(line)
    return lines


def of(program: str) -> list[str]:
    return [c for c in commands() if c.split()[0] == program]


def test_the_readme_shows_each_kind_of_command():
    assert of("medpipe") and of("snakemake") and of("make")


@cache
def help_text(subcommand: str) -> str:
    result = subprocess.run([str(BIN / "medpipe"), subcommand, "--help"], capture_output=True,
                            **TEXT, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, f"medpipe {subcommand}: {result.stderr[-500:]}"
    return result.stdout


@pytest.mark.parametrize("command", of("medpipe"))
def test_medpipe_commands_and_options_exist(command):
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    text = help_text(words[1])
    for word in words[2:]:
        if word.startswith("-"):
            assert word.split("=")[0] in text, f"{command}: no option {word}"


@pytest.mark.parametrize("command", of("make"))
def test_make_targets_exist(command):
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    for target in command.split()[1:]:
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), target


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder laid out like the repository (its Snakefile, rules and configs) with a small
    demo dataset where `configs/demo.yaml` looks for it, and a `my.yaml` as a user writes."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("Snakefile", "workflow", "configs"):
        (root / name).symlink_to(REPO / name)
    build_demo_dataset(root / "demo" / "raw", DemoSettings(cases=5, test_cases=0, spacing=6.0))
    (root / "my.yaml").write_text(yaml.safe_dump(
        {"dataset": "demo/raw", "results": "demo/results", "train_folds": [0]}))
    return root


def dry_runs() -> list[str]:
    """The README's snakemake commands as dry runs, each distinct one once (a command shown
    with and without `-n`, or twice, plans one DAG)."""
    runs = {}
    for command in of("snakemake"):
        words = shlex.split(command)
        runs.setdefault(tuple(sorted(words + ["-n"] * ("-n" not in words))), command)
    return list(runs.values())


@pytest.mark.slow
@pytest.mark.parametrize("command", dry_runs())
def test_snakemake_commands_plan_their_dag(command, workdir):
    words = shlex.split(command)
    if "apptainer" in words and not shutil.which("apptainer"):
        pytest.skip("Snakemake checks for the apptainer binary even in a dry run")
    if "-n" not in words:
        words.append("-n")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(words, cwd=workdir, capture_output=True, **TEXT, timeout=300,
                            env=env)
    assert result.returncode == 0, f"{command}\n{result.stdout[-1500:]}{result.stderr[-1500:]}"
    assert "Job stats" in result.stdout or "Nothing to be done" in result.stdout


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_snippets_name_only_what_they_define(index, tmp_path):
    snippet = tmp_path / f"snippet_{index}.py"
    snippet.write_text(blocks("python")[index], encoding="utf-8")
    compile(snippet.read_text(), str(snippet), "exec")
    result = subprocess.run([str(BIN / "ruff"), "check", "--isolated", "--select", "F821",
                             str(snippet)], capture_output=True, **TEXT, timeout=60)
    assert result.returncode == 0, result.stdout
