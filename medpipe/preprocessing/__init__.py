"""Preprocessing as nnU-Net does it: the array steps (`resampling`), what was done to a case
(`properties`), and whole cases, their files and the way back to the raw grid (`cases`)."""

from medpipe.data.layout import read_case
from medpipe.preprocessing.cases import (
    PreprocessedCase,
    PreprocessingPlan,
    crop_and_normalise,
    is_preprocessed,
    load_labelled_cases,
    load_preprocessed,
    preprocess_case,
    preprocess_dataset,
    preprocess_images,
    restore_label,
    restore_label_from_probabilities,
    restore_probability_maps,
)
from medpipe.preprocessing.properties import CaseProperties
from medpipe.preprocessing.resampling import (
    coarse_axis,
    crop_to_nonzero,
    new_shape_for,
    normalise,
    resample_images,
    resample_label,
    resized_geometry,
)

__all__ = [
    "CaseProperties",
    "PreprocessedCase",
    "PreprocessingPlan",
    "coarse_axis",
    "crop_and_normalise",
    "crop_to_nonzero",
    "is_preprocessed",
    "load_labelled_cases",
    "load_preprocessed",
    "new_shape_for",
    "normalise",
    "preprocess_case",
    "preprocess_dataset",
    "preprocess_images",
    "read_case",
    "resample_images",
    "resample_label",
    "resized_geometry",
    "restore_label",
    "restore_label_from_probabilities",
    "restore_probability_maps",
]
