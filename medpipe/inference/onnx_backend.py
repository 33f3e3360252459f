"""ONNX export of a trained fold's network, and that network run by onnxruntime.

Only the network travels as ONNX: preprocessing, sliding windows, mirroring and the way back
to the scan's grid stay medpipe's (`Segmenter`), as they are in Python for the torch backend.
That is the part an ONNX graph cannot carry well (MONAI's sliding-window inferer does not
export, MONAI issue #6526), and keeping it shared is what makes both backends' labels agree.
The graph takes a batch of patches (1, C, *patch) with a dynamic batch axis and returns the
full-resolution logits (deep supervision's extra outputs are a training-time thing). The run's
description and plans go inside the file as metadata (`medpipe.run_spec`, `medpipe.plans`), so
one `.onnx` file is a complete model for `predict --backend onnxruntime`.

A registration network exports whole, transform included (its field integration by scaling
and squaring and its warps are `grid_sample`s, ONNX's GridSample, 5D from opset 20): moving and
fixed image on the network's padded grid in, warped image and displacement field (voxels) out;
pre-alignment, resampling and composing the field onto the fixed scan stay medpipe's
(`NetworkRegistration`), as for torch.

Exported by torch's dynamo-based exporter (`torch.onnx.export(dynamo=True)`, onnxscript),
which torch has made its default; MONAI's own exporter relied on the older TorchScript path
(MONAI issues #8382, #8587).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import TypeAdapter
from torch import nn

from medpipe.errors import MedpipeError
from medpipe.io import atomic_output
from medpipe.models.sliding_window import main_output
from medpipe.planning.plans import Plans, parse_plans
from medpipe.runs.loading import load_trained, read_run_plans, run_folders
from medpipe.runs.spec import AnyRunSpec, SegmentationRunSpec

SPEC_KEY = "medpipe.run_spec"
PLANS_KEY = "medpipe.plans"
OPSET = 20  # GridSample on volumes (registration networks)


def uses_onnx(source: object, backend: str) -> bool:
    """Whether SOURCE is run by onnxruntime: BACKEND "onnxruntime" with a `.onnx` file;
    either without the other is refused, naming what to do."""
    is_onnx = isinstance(source, str | Path) and str(source).endswith(".onnx")
    if is_onnx != (backend == "onnxruntime"):
        raise MedpipeError(
            "an ONNX model runs with --backend onnxruntime" if is_onnx else
            "--backend onnxruntime runs a .onnx file (make one with `medpipe export`)",
            Path(str(source)))
    return is_onnx


class _MainOutput(nn.Module):
    """The network as inference calls it: logits of the full-resolution head only."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        return main_output(self.network(patch))


class _AllParts(nn.Module):
    """A registration network with its global stage's share of the field as a third output
    (zeros without one): instance optimisation leaves it out of its penalty."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        warped, ddf, global_ddf = self.network(moving, fixed, parts=True)
        return warped, ddf, torch.zeros_like(ddf) if global_ddf is None else global_ddf


def export_onnx(source: str | Path, output: str | Path, checkpoint: str = "best") -> Path:
    """Write the network of the one fold SOURCE names (a run folder, checkpoint or models:/
    URI) to OUTPUT (.onnx), its run description and plans inside as metadata."""
    import onnx

    output = Path(output)
    if output.suffix != ".onnx":
        raise MedpipeError("the exported model's file name must end in .onnx", output)
    members = run_folders(source, checkpoint)
    if len(members) != 1:
        raise MedpipeError(f"names {len(members)} folds; export one fold's run folder "
                           "(MODEL/fold_K) at a time", Path(str(source)))
    folder, name = members[0]
    network, spec = load_trained(folder, name, "cpu")
    plans = read_run_plans(folder)
    if isinstance(spec, SegmentationRunSpec):  # a batch of patches
        example = (torch.zeros(1, spec.in_channels, *spec.patch_size),)
        names = {"input_names": ["image"], "output_names": ["logits"],
                 "dynamic_shapes": {"patch": {0: torch.export.Dim("batch", min=1, max=1024)}}}
        module = _MainOutput(network)
    else:  # one pair on the network's padded grid
        example = tuple(torch.zeros(1, spec.in_channels, *spec.grid_shape) for _ in range(2))
        names = {"input_names": ["moving", "fixed"],
                 "output_names": ["warped", "ddf", "global_ddf"]}
        module = _AllParts(network)
    with atomic_output(output) as staging:
        try:
            torch.onnx.export(module.eval(), example, str(staging), dynamo=True,
                              opset_version=OPSET, verbose=False, **names)
        except Exception as error:  # the exporter's own errors are long; name the model
            raise MedpipeError(f"{spec.model} did not export to ONNX: "
                               f"{str(error).splitlines()[0][:300]}", folder.path) from None
        model = onnx.load(str(staging))
        onnx.helper.set_model_props(model, {
            SPEC_KEY: spec.model_dump_json(), PLANS_KEY: json.dumps(plans.model_dump(mode="json")),
            "medpipe.checkpoint": name})
        onnx.save(model, str(staging))
    return output


class OnnxNetwork(nn.Module):
    """An exported network run by onnxruntime on the CPU, callable as the torch network
    (float32 tensors in, the graph's outputs back as tensors: one, or a tuple), so the
    sliding-window and registration code serve both."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *tensors: torch.Tensor,
                parts: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The graph's outputs; for a registration network (warped, ddf), with PARTS its
        global share too, as the torch network's `parts`."""
        feed = {name: np.ascontiguousarray(t.detach().float().cpu().numpy())
                for name, t in zip(self.input_names, tensors, strict=True)}
        outputs = tuple(torch.from_numpy(o) for o in self.session.run(None, feed))
        if len(outputs) == 1:
            return outputs[0]
        if not parts:
            return outputs[:2]
        return outputs if len(outputs) == 3 else (*outputs, None)  # exported before 3


def read_onnx_model(path: str | Path) -> tuple[OnnxNetwork, AnyRunSpec, Plans]:
    """(network, run description, plans) of an exported `.onnx` file."""
    path = Path(path)
    if not path.is_file():
        raise MedpipeError("model not found", path)
    try:
        network = OnnxNetwork(path)
    except Exception as error:  # onnxruntime's own classes (InvalidProtobuf, Fail, ...)
        reason = str(error).rsplit("failed:", 1)[-1].strip()[:200]
        raise MedpipeError(f"not a readable ONNX model ({reason})", path) from None
    metadata = network.session.get_modelmeta().custom_metadata_map
    if SPEC_KEY not in metadata or PLANS_KEY not in metadata:
        raise MedpipeError("an ONNX model without medpipe's metadata (export it with "
                           "`medpipe export`)", path)
    spec = TypeAdapter(AnyRunSpec).validate_json(metadata[SPEC_KEY])
    return network, spec, parse_plans(json.loads(metadata[PLANS_KEY]), path)
