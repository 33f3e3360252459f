"""ANTs SyN, the second classical baseline, run by ANTsPy in its own environment.

ANTsPy (`antspyx` 0.6.3) pins numpy below the version medpipe runs on, so it is not imported
here: `AntsRegistration` starts `ants_worker.py` once under the Python of an environment that
has it (`make ants-env` builds `.venv-ants`) and sends it one pair at a time; start-up (about
2 s of imports) is paid once, not per pair. Which Python: $MEDPIPE_ANTS_PYTHON, else the
repository's `.venv-ants`, else this interpreter when it can import `ants`.

The answer is ANTsPy's `fwdtransforms` ([warp, affine]: fixed points are displaced by the
warp, then mapped by the affine into the moving image), read back with SimpleITK into one
transform in ITK's direction, as `register_classical` returns; `displacement_field` then
samples it on any grid, so ANTs is scored through the same field as every other method.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medpipe.config import AntsSettings
from medpipe.errors import MedpipeError
from medpipe.io import Volume, write_image

WORKER = Path(__file__).with_name("ants_worker.py")
ENVIRONMENT = Path(__file__).resolve().parents[2] / ".venv-ants"


def ants_python() -> Path:
    """The Python that runs ANTsPy (see the module's docstring for the order)."""
    if os.environ.get("MEDPIPE_ANTS_PYTHON"):
        python = Path(os.environ["MEDPIPE_ANTS_PYTHON"])
        if not python.is_file():
            raise MedpipeError("MEDPIPE_ANTS_PYTHON names no Python (`make ants-env` builds "
                               ".venv-ants with ANTsPy)", python)
        return python
    if (ENVIRONMENT / "bin" / "python").is_file():
        return ENVIRONMENT / "bin" / "python"
    if find_spec("ants") is not None:
        return Path(sys.executable)
    raise MedpipeError("the ants baseline needs ANTsPy: `make ants-env` builds .venv-ants "
                       "with it, or set MEDPIPE_ANTS_PYTHON to a Python that has antspyx")


class AntsRegistration:
    """`(fixed, moving) -> transform` (fixed points -> moving points) by ANTs; one worker
    process for every pair, closed with the object (use it as a context manager)."""

    def __init__(self, settings: AntsSettings | None = None) -> None:
        self.settings = settings or AntsSettings()
        self.folder = tempfile.TemporaryDirectory(prefix="medpipe-ants-")
        command = [str(ants_python()), "-I", str(WORKER)]  # -I: not this folder on sys.path
        if self.settings.deterministic:
            command.append("--deterministic")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, encoding="utf-8")
        ready = self._reply()
        self.version = ready.get("ready")
        self.seconds = 0.0  # ANTs' own time for the last pair
        self._pairs = 0

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.close()
            raise MedpipeError("the ANTs worker ended without answering (is antspyx "
                               "installed in that environment?)", ants_python())
        return json.loads(line)

    def __call__(self, fixed: Volume, moving: Volume) -> sitk.Transform:
        self._pairs += 1
        folder = Path(self.folder.name) / f"pair_{self._pairs}"
        folder.mkdir()
        # ANTsPy starts from the centres of mass: with the negative background of a
        # normalised scan they land anywhere (the registration then fails, "all samples
        # map outside moving image buffer"), so both images start at 0; mutual information
        # does not see the shift
        for volume, name in ((fixed, "fixed"), (moving, "moving")):
            shifted = (volume.array - volume.array.min()).astype(np.float32)
            write_image(volume.with_array(shifted), folder / f"{name}.nii.gz")
        request = {"fixed": str(folder / "fixed.nii.gz"), "moving": str(folder / "moving.nii.gz"),
                   "prefix": str(folder / "out_"), "transform": self.settings.transform,
                   "seed": self.settings.seed}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            hint = (f"; ANTsPy's {self.settings.transform} shrinks images 4x first, too much "
                    f"for one of {min(fixed.shape[:3])} voxels" if min(fixed.shape[:3]) < 48
                    else "")
            raise MedpipeError(f"ANTs failed: {reply['error']}{hint}", folder)
        self.seconds = reply["seconds"]
        return read_ants_transforms(reply["transforms"])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self.folder.cleanup()

    def __enter__(self) -> AntsRegistration:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_ants_transforms(paths: list[str]) -> sitk.Transform:
    """ANTs' `fwdtransforms` ([warp, affine]) as one SimpleITK transform: a fixed point p
    maps to affine(warp(p)), and SimpleITK's composite applies its last transform first.
    (Checked: resampling through it reproduces `ants.apply_transforms` exactly; the other
    order does not.)"""
    transforms = []
    for path in paths:
        if path.endswith((".nii.gz", ".nii")):
            field = sitk.Cast(sitk.ReadImage(path), sitk.sitkVectorFloat64)
            transforms.append(sitk.DisplacementFieldTransform(field))
        else:
            transforms.append(sitk.ReadTransform(path))
    return sitk.CompositeTransform(transforms[::-1])
