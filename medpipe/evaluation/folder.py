"""`medpipe evaluate-folder`: score any folder of label maps against a folder of references,
as nnU-Net's `nnUNetv2_evaluate_folder` does — the workflow's test-set predictions, or a
prediction made by any other tool.

Files pair by name (`CASE` + the dataset's file ending); every reference needs a
prediction on its exact grid. Classes (or regions) and the file ending come from the
dataset's `dataset.json`. Writes `cases.csv` and `summary.json` with the same columns and
keys as `evaluate-seg`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medpipe.data.labels import LabelScheme
from medpipe.data.layout import read_spec
from medpipe.errors import MedpipeError
from medpipe.evaluation.segmentation import summarise_cases, write_cases_table
from medpipe.io import read_image, write_json
from medpipe.metrics import segmentation_metrics


def evaluate_folder(references: Path, predictions: Path, dataset: Path,
                    output: Path) -> dict[str, Any]:
    """Score PREDICTIONS against REFERENCES (label maps named CASE + file ending) with the
    labels of DATASET's dataset.json; write OUTPUT/cases.csv and OUTPUT/summary.json."""
    spec = read_spec(dataset)
    classes = LabelScheme.from_labels(spec.labels, spec.regions_class_order).scored_classes
    ending = spec.file_ending
    cases = sorted(p.name[: -len(ending)] for p in Path(references).glob(f"*{ending}"))
    if not cases:
        raise MedpipeError(f"no reference label maps (*{ending})", references)
    missing = [c for c in cases if not (Path(predictions) / f"{c}{ending}").is_file()]
    if missing:
        raise MedpipeError(f"no prediction for {len(missing)} reference(s): "
                           f"{', '.join(missing[:5])}", predictions)
    rows = []
    for case_id in cases:
        reference = read_image(Path(references) / f"{case_id}{ending}")
        predicted = read_image(Path(predictions) / f"{case_id}{ending}")
        if predicted.shape != reference.shape or \
                not predicted.geometry.is_close(reference.geometry):
            raise MedpipeError("prediction does not lie on its reference's grid",
                               Path(predictions) / f"{case_id}{ending}")
        scores = segmentation_metrics(predicted.array, reference.array, classes,
                                      reference.spacing)
        rows += [{"case_id": case_id, "class": name, **values}
                 for name, values in scores.items()]
    summary = {"predictions": str(predictions), "references": str(references),
               **summarise_cases(rows, classes, cases)}
    write_cases_table(rows, Path(output) / "cases.csv")
    write_json(summary, Path(output) / "summary.json")
    return summary
