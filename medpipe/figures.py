"""Figures written to disk (PNG, headless): learning curves, label overlays, registrations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from medpipe.io import atomic_output

_COLOURS = [(0.2, 0.6, 1), (1, 0.4, 0.2), (1, 1, 0.3), (0.4, 1, 0.4), (0.9, 0.3, 0.9)]


def label_colours(n_classes: int, alpha: float = 0.5) -> ListedColormap:
    """Transparent background, then a fixed colour per class (cycled)."""
    colours = [(0, 0, 0, 0)] + [
        (*_COLOURS[i % len(_COLOURS)], alpha) for i in range(max(1, n_classes - 1))
    ]
    return ListedColormap(colours)


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 80) -> Path:
    path = Path(path)
    with atomic_output(path) as staging:
        fig.savefig(staging, dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return path


def show_slice(ax, image: np.ndarray, label: np.ndarray | None, n_classes: int, title: str):
    """One 2D slice, array axis 0 drawn left-right and axis 1 bottom-up."""
    ax.imshow(image.T, cmap="gray", origin="lower")
    if label is not None:
        ax.imshow(
            label.T, cmap=label_colours(n_classes), vmin=0, vmax=max(1, n_classes - 1),
            origin="lower", interpolation="nearest",
        )
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_learning_curve(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Training loss per epoch and, where validated, the validation score."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    validated = [h for h in history if "val_score" in h]
    if validated:
        twin = ax.twinx()
        twin.plot([h["epoch"] for h in validated], [h["val_score"] for h in validated],
                  "o-", color="tab:orange", label="validation score")
        twin.set_ylabel("validation score")
        twin.set_ylim(0, 1)
        twin.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_segmentation_overlay(
    image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, n_classes: int,
    path: str | Path, title: str = "", legend: Mapping[int, str] | None = None,
) -> Path:
    """Mid slices along each axis: the image, the reference and the prediction overlaid;
    LEGEND (label value -> class name) names the colours below the panels."""
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(3, 3, figsize=(8, 8.4))
    for axis in range(3):
        index = image.shape[axis] // 2
        cut = [np.take(a, index, axis=axis) for a in (image, reference, prediction)]
        show_slice(axes[axis, 0], cut[0], None, n_classes, f"{title} image, axis {axis}")
        show_slice(axes[axis, 1], cut[0], cut[1], n_classes, "reference")
        show_slice(axes[axis, 2], cut[0], cut[2], n_classes, "prediction")
    if legend:
        colours = label_colours(n_classes, alpha=1.0).colors
        handles = [Patch(color=colours[value], label=name)
                   for value, name in sorted(legend.items()) if 0 < value < len(colours)]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
                   frameon=False)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    else:
        fig.tight_layout()
    return save_figure(fig, path)


def plot_registration(
    fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, ddf: np.ndarray,
    path: str | Path, title: str = "", axis: int = 2,
) -> Path:
    """One mid slice across AXIS: fixed, moving, warped moving, the deformation drawn as a
    warped grid, and the Jacobian determinant (red: < 1, shrinking; blue: > 1; black
    contour: folding, <= 0). DDF is (3, X, Y, Z) in voxels on the fixed grid."""
    from medpipe.metrics import jacobian_determinant

    index = fixed.shape[axis] // 2
    cut = [np.take(a, index, axis=axis) for a in (fixed, moving, warped)]
    in_plane = [a for a in range(3) if a != axis]
    flow = [np.take(ddf[a], index, axis=axis) for a in in_plane]
    det = np.take(jacobian_determinant(ddf), index, axis=axis)
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.4))
    for ax, image, name in zip(axes[:3], cut, ("fixed", "moving", "warped"), strict=True):
        show_slice(ax, image, None, 1, f"{title} {name}" if name == "fixed" else name)
    ax = axes[3]
    rows, cols = np.meshgrid(np.arange(cut[0].shape[0]), np.arange(cut[0].shape[1]),
                             indexing="ij")
    x, y = rows + flow[0], cols + flow[1]
    step = max(1, min(cut[0].shape) // 20)
    for i in range(0, x.shape[0], step):
        ax.plot(x[i, :], y[i, :], color="k", linewidth=0.5)
    for j in range(0, x.shape[1], step):
        ax.plot(x[:, j], y[:, j], color="k", linewidth=0.5)
    ax.set_aspect("equal")
    ax.set_title("deformation grid", fontsize=8)
    ax.axis("off")
    ax = axes[4]
    shown = ax.imshow(det.T, cmap="RdBu", vmin=0, vmax=2, origin="lower")
    if (det <= 0).any():
        ax.contour(det.T, levels=[0], colors="k", linewidths=0.8)
    ax.set_title(f"Jacobian determinant (min {det.min():.2f})", fontsize=8)
    ax.axis("off")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, path)
