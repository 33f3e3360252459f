"""The container recipes cannot be built here (no Docker or Apptainer, no network at run
time); what can be checked is that every file they copy exists and that they install
medpipe on a CUDA PyTorch base."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dockerfile_copies_existing_files_onto_a_cuda_base():
    text = (REPO / "containers" / "Dockerfile").read_text()
    assert re.search(r"^FROM pytorch/pytorch:[\w.]+-cuda[\d.]+-cudnn\d+-runtime$", text, re.M)
    sources = [s for line in re.findall(r"^COPY (.+)$", text, re.M)
               for s in line.split()[:-1]]
    assert sources and all((REPO / s).exists() for s in sources), sources
    assert "pip install ." in text


def test_apptainer_recipe_copies_existing_files_and_installs_medpipe():
    text = (REPO / "containers" / "medpipe.def").read_text()
    assert re.search(r"^Bootstrap: docker$", text, re.M)
    assert re.search(r"^From: pytorch/pytorch:\S+-cuda", text, re.M)
    files = text.split("%files", 1)[1].split("%", 1)[0]
    sources = [line.split()[0] for line in files.strip().splitlines()]
    assert sources and all((REPO / s).exists() for s in sources), sources
    assert "pip install --no-cache-dir /opt/medpipe" in text
