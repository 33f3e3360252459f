"""nnU-Net's postprocessing, decided on cross-validation and applied to new predictions:
keep only the largest connected component, where that was measured to help.

The decision follows nnU-Net v2's `determine_postprocessing`: first, the largest component
of the whole foreground (every class together) is kept if that raises the mean foreground
Dice over the cross-validation cases and lowers no class's Dice; then, for each class (or
region) in dataset.json's order, on the result so far, its largest component is kept if
that raises the class's own Dice. Removed voxels become background. Components are
26-connected (diagonal neighbours count), as scikit-image's default full connectivity that
nnU-Net labels with (acvl_utils `label_with_component_sizes`).

The decision is written as `postprocessing.json` in the model's folder (beside its folds);
`medpipe predict --postprocessing FILE` applies it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import ndimage

from medpipe.data.labels import LabelScheme
from medpipe.errors import MedpipeError
from medpipe.io import read_image, write_json

CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


class Postprocessing(BaseModel):
    """What to do to a predicted label map, and the cross-validation Dice that decided it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    foreground_largest_component: bool
    largest_component_classes: tuple[str, ...]  # class or region names, in order applied
    class_values: dict[str, tuple[int, ...]]  # the label values of each class or region
    cases: int
    dice_before: dict[str, float]
    dice_after: dict[str, float]

    @property
    def chosen(self) -> list[str]:
        """What keeps only its largest component, in words, in the order applied."""
        return (["the foreground"] if self.foreground_largest_component else []) + list(
            self.largest_component_classes)

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """LABELS with the chosen components removed (a copy)."""
        out = labels.copy()
        if self.foreground_largest_component:
            out = keep_largest(out, [v for values in self.class_values.values() for v in values])
        for name in self.largest_component_classes:
            out = keep_largest(out, self.class_values[name])
        return out


def keep_largest(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """LABELS with every component of (labels in VALUES) but the largest set to 0."""
    mask = np.isin(labels, values)
    components, count = ndimage.label(mask, structure=CONNECTIVITY)
    if count <= 1:
        return labels
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    out = labels.copy()
    out[mask & (components != int(np.argmax(sizes)))] = 0
    return out


def _mean_dice(predictions: Sequence[np.ndarray], references: Sequence[np.ndarray],
               classes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Per class, the mean Dice over cases (a case with the class in neither map skipped)."""
    means = {}
    for name, values in classes.items():
        scores = []
        for predicted, reference in zip(predictions, references, strict=True):
            p, r = np.isin(predicted, values), np.isin(reference, values)
            total = int(p.sum()) + int(r.sum())
            if total:
                scores.append(2.0 * np.count_nonzero(p & r) / total)
        means[name] = float(np.mean(scores)) if scores else math.nan
    return means


def _foreground(dice: dict[str, float]) -> float:
    return float(np.nanmean(list(dice.values())))


def determine_postprocessing(predictions: Sequence[np.ndarray],
                             references: Sequence[np.ndarray],
                             scheme: LabelScheme) -> Postprocessing:
    """nnU-Net's decision on cross-validation PREDICTIONS against their REFERENCES."""
    classes = scheme.classes
    current = list(predictions)
    before = _mean_dice(current, references, classes)
    best = before
    all_values = [v for values in classes.values() for v in values]
    candidate = [keep_largest(p, all_values) for p in current]
    after = _mean_dice(candidate, references, classes)
    foreground = _foreground(after) > _foreground(best) and not any(
        after[n] < best[n] for n in classes if not math.isnan(best[n]))
    if foreground:
        current, best = candidate, after
    chosen = []
    if len(classes) > 1:
        for name, values in classes.items():
            candidate = [keep_largest(p, values) for p in current]
            after = _mean_dice(candidate, references, classes)
            if after[name] > best[name]:
                current, best = candidate, after
                chosen.append(name)
    return Postprocessing(foreground_largest_component=foreground,
                          largest_component_classes=tuple(chosen), class_values=classes,
                          cases=len(predictions), dice_before=before, dice_after=best)


def postprocessing_for_model(model_dir: Path, references: Path, scheme: LabelScheme,
                             ending: str) -> Postprocessing:
    """The decision on every trained fold's validation predictions
    (MODEL_DIR/fold_K/validation/CASE + ENDING, written by `evaluate-seg`) against
    REFERENCES/CASE + ENDING; written to MODEL_DIR/postprocessing.json."""
    files = sorted(Path(model_dir).glob(f"fold_*/validation/*{ending}"))
    if not files:
        raise MedpipeError("no cross-validation predictions (fold_K/validation/, written by "
                           "`medpipe evaluate-seg`) to decide the postprocessing on", model_dir)
    predictions, targets = [], []
    for path in files:
        reference = Path(references) / path.name
        if not reference.is_file():
            raise MedpipeError(f"no reference label map for {path.name}", references)
        predictions.append(read_image(path).array)
        targets.append(read_image(reference).array)
    decision = determine_postprocessing(predictions, targets, scheme)
    write_json(decision.model_dump(mode="json"), Path(model_dir) / "postprocessing.json")
    return decision


def read_postprocessing(path: Path) -> Postprocessing:
    try:
        return Postprocessing.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MedpipeError(f"not a medpipe postprocessing file ({str(error).splitlines()[0]})",
                           path) from None
