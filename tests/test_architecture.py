"""The house keeps its floors: a module imports only from floors below it (or its own), the
three stages (training, evaluation, inference) never import each other, and the config
schema the Snakefile validates with is the one medpipe's config types generate."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from medpipe.config import SCHEMA_HEADER, config_schema
from medpipe.config_template import settings_reference

PACKAGE = Path(__file__).resolve().parents[1] / "medpipe"
REPO = PACKAGE.parent

# the README's Architecture section, as numbers: lower imports nothing higher
FLOORS = {
    "medpipe.errors": 0, "medpipe.io": 0, "medpipe.parallel": 0, "medpipe.training_settings": 0,
    "medpipe.config": 1, "medpipe.runs.folder": 1, "medpipe.tracked": 1,
    "medpipe.device": 1, "medpipe.spatial": 1, "medpipe.sampling": 1, "medpipe.progress": 1,
    "medpipe.metrics": 1, "medpipe.figures": 1,
    "medpipe.data": 2, "medpipe.postprocessing": 2,
    # the typed plans and the array steps of preprocessing come before the fingerprint
    # (which crops as preprocessing does) and the planner
    "medpipe.planning.plans": 3, "medpipe.preprocessing.resampling": 3,
    "medpipe.preprocessing.properties": 3,
    "medpipe.planning": 4,
    "medpipe.preprocessing": 5,
    "medpipe.models": 6, "medpipe.config_template": 7,
    "medpipe.runs": 7,
    "medpipe.tracking_buffer": 7, "medpipe.tracking": 8,
    "medpipe.registration": 9,
    "medpipe.training": 10, "medpipe.evaluation": 10, "medpipe.inference": 10,
    "medpipe.report": 11,
    "medpipe.cli": 12, "medpipe": 12,
}
STAGES = ("medpipe.training", "medpipe.evaluation", "medpipe.inference")
# imports inside a function that reach up on purpose, each for a stated reason
LAZY_UPWARDS = {
    # the config validates its `models` section with each model's own options type
    ("medpipe.config", "medpipe.models"),
    # `import medpipe` stays light; the loaders are imported when first used
    ("medpipe", "medpipe.inference.segmenter"), ("medpipe", "medpipe.inference.registrator"),
    # a `models:/` URI is downloaded by the tracking module
    ("medpipe.runs.loading", "medpipe.tracking"),
}


def floor(module: str) -> int:
    while module not in FLOORS:
        module = module.rpartition(".")[0]
    return FLOORS[module]


def stage(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported medpipe module, at module level?) for every import in PATH."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "medpipe":
                names = [f"medpipe.{alias.name}" for alias in node.names]
            found += [(n, id(node) in top_level) for n in names if n.startswith("medpipe")]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top_level) for a in node.names
                      if a.name.startswith("medpipe")]
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up_the_floors(path):
    importer = module_name(path)
    for imported, top_level in imports(path):
        if imported in FLOORS or "." in imported.removeprefix("medpipe"):
            if importer == imported or imported.startswith(importer + "."):
                continue  # a package's own modules
            ours, theirs = stage(importer), stage(imported)
            assert not (ours and theirs and ours != theirs), \
                f"{importer} imports the sibling stage {imported}"
            upwards = floor(imported) > floor(importer)
            if upwards and not top_level and any(
                    importer == low and imported.startswith(high)
                    for low, high in LAZY_UPWARDS):
                continue
            assert not upwards, f"{importer} (floor {floor(importer)}) imports {imported} " \
                                f"(floor {floor(imported)})"


def test_the_floor_map_knows_every_module():
    unknown = [module_name(p) for p in SOURCES
               if not any(module_name(p) == m or module_name(p).startswith(m + ".")
                          for m in FLOORS)]
    assert not unknown


def test_the_committed_schema_is_the_one_the_config_types_generate():
    text = (REPO / "configs" / "schema.yaml").read_text(encoding="utf-8")
    assert text.startswith(SCHEMA_HEADER), "regenerate: medpipe config-schema"
    assert yaml.safe_load(text) == config_schema(), "regenerate: medpipe config-schema"


def test_the_settings_reference_is_current():
    text = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    assert text == settings_reference(), "regenerate: medpipe config-schema"
