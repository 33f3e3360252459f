"""A commented config for a dataset (`medpipe init`) and the settings reference
(`docs/settings.md`), both written from the config types themselves, so neither can drift.

Every setting appears with its default and its description; the `models` section lists each
registered model with its own options' defaults and its literature optimiser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from medpipe.config import PipelineConfig
from medpipe.data.layout import DatasetSpec
from medpipe.models import MODELS
from medpipe.training_settings import OptimizerConfig

INDENT = "  "
# settings whose defaults are per model, not one value
PER_MODEL = ("training.optimizer", "models")


def _inline(value: Any) -> str:
    """VALUE as one line of YAML (flow style)."""
    text = yaml.safe_dump(to_jsonable_python(value), default_flow_style=True, width=10**6,
                          sort_keys=False)
    return text.strip().removesuffix("...").strip()


def _fields(values: BaseModel, depth: int) -> list[str]:
    """The commented YAML lines of VALUES' fields, nested sections indented."""
    lines = []
    pad = INDENT * depth
    for name, field in type(values).model_fields.items():
        value = getattr(values, name)
        if field.description:
            lines.append(f"{pad}# {field.description}")
        if name == "optimizer":
            lines += [f"{pad}# fields: {', '.join(OptimizerConfig.model_fields)}; those left "
                      "out take the model's own defaults (see `models`)", f"{pad}optimizer: {{}}"]
        elif name == "models" and isinstance(values, PipelineConfig):
            lines += _models_section(pad)
        elif isinstance(value, BaseModel):
            lines += [f"{pad}{name}:", *_fields(value, depth + 1)]
        else:
            lines.append(f"{pad}{name}: {_inline(value)}")
    return lines


def _models_section(pad: str) -> list[str]:
    lines = [f"{pad}models:"]
    for name, spec in sorted(MODELS.items()):
        optimizer = spec.optimizer_defaults.model_dump(exclude_unset=True)
        lines += [f"{pad}{INDENT}# {spec.task}: {spec.description}; optimiser "
                  f"{_inline(optimizer)}",
                  f"{pad}{INDENT}{name}:",
                  f"{pad}{INDENT * 2}options: {_inline(spec.options())}",
                  f"{pad}{INDENT * 2}training: {{}}"]
    return lines


def config_template(dataset: Path, spec: DatasetSpec, results: Path) -> str:
    """A complete config for DATASET: every setting with its default and what it does."""
    channels = ", ".join(f"{k}: {v}" for k, v in spec.channel_names.items())
    labels = ", ".join(f"{k} {v}" for k, v in spec.labels.items())
    header = [
        f"# medpipe pipeline config for {spec.name or dataset.name}, written by `medpipe init`.",
        f"# dataset.json: channels {channels}; labels {labels}; files {spec.file_ending}.",
        "# Every setting is shown with its default: change what you need, delete the rest.",
        "# Run: snakemake all --profile configs/profiles/local --configfile THIS_FILE", "",
    ]
    body = _fields(PipelineConfig(dataset=dataset, results=results), 0)
    return "\n".join(header + body) + "\n"


def settings_reference() -> str:
    """Markdown: every setting of a pipeline config, its default and what it does."""
    rows = ["# Pipeline config settings", "",
            "Generated from `medpipe.config` by `medpipe config-schema`; `medpipe init "
            "DATASET -o config.yaml` writes a commented config with all of them.", "",
            "| setting | default | what it does |", "| --- | --- | --- |"]

    def walk(values: BaseModel, prefix: str) -> None:
        for name, field in type(values).model_fields.items():
            value, key = getattr(values, name), f"{prefix}{name}"
            per_model = key in PER_MODEL
            if isinstance(value, BaseModel) and not per_model:
                walk(value, f"{key}.")
                continue
            shown = "per model" if per_model else f"`{_inline(value)}`"
            rows.append(f"| `{key}` | {shown} | {field.description or ''} |")

    walk(PipelineConfig(dataset=Path("DATASET"), results=Path("RESULTS")), "")
    walk(OptimizerConfig(), "training.optimizer.")
    rows += ["", "`models.<name>.training` takes the fields of `training`, and "
             "`models.<name>.options` the model's own options:", "",
             "| model | task | options (defaults) | optimiser defaults | `recipe: native` |",
             "| --- | --- | --- | --- | --- |"]
    for name, spec in sorted(MODELS.items()):
        optimizer = spec.optimizer_defaults.model_dump(exclude_unset=True)
        native = spec.recipe_source or "its optimiser defaults"
        rows.append(f"| `{name}` | {spec.task} | `{_inline(spec.options())}` | "
                    f"`{_inline(optimizer)}` | {native} |")
    return "\n".join(rows) + "\n"
