"""bf16 autocast against fp32 on this CPU: seconds per training step and per inference of a
VoxelMorph network (one 64x80x64 pair, the demo's 3 mm grid) and of a DynUNet (batch 2 x
80x80x64 patches, nnU-Net's demo plans with features 8-128), the basis of
`medpipe.device.autocast_dtype`'s CPU rule.

Both precisions run alternately (fp32, bf16, fp32, bf16, ...) on the same inputs and the
fastest repeat of each counts, so the machine's drift affects both alike. The losses are
medpipe's own (the registration loss runs in fp32 with autocast off, as in training).
Writes bench/results/autocast_cpu.json.

    python bench/autocast_cpu.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import SMOKE, demo_pipeline, write_results


def networks() -> dict:
    """name -> (network, inputs, loss of (network, inputs))."""
    from monai.losses import DiceCELoss

    from medpipe.config import NetworkRegistrationSettings
    from medpipe.models import NetworkShape, build_model
    from medpipe.planning.plans import read_plans
    from medpipe.registration.loss import RegistrationLoss

    torch.manual_seed(0)
    shape = (32, 32, 32) if SMOKE else (64, 80, 64)
    patch = (32, 32, 32) if SMOKE else (80, 80, 64)
    voxelmorph = build_model("voxelmorph", NetworkShape(1, 3), {})
    pair = (torch.randn(1, 1, *shape), torch.randn(1, 1, *shape),
            torch.randint(0, 4, (1, 1, *shape)))
    registration_loss = RegistrationLoss(NetworkRegistrationSettings(), n_classes=4)

    def register(net, inputs):
        moving, fixed, labels = inputs
        warped, ddf = net(moving, fixed)
        return registration_loss(warped, fixed, ddf, labels, labels)

    plans = read_plans(demo_pipeline() / "results" / "plans.json")  # the demo's topology
    architecture = plans.configuration("3d_fullres").architecture.arch_kwargs
    dynunet = build_model("nnunet", NetworkShape(1, plans.out_channels, architecture),
                          {"features_per_stage": [8 * 2**i for i in range(architecture.n_stages)]})
    patches = (torch.randn(2, 1, *patch), torch.randint(0, 4, (2, 1, *patch)))
    segmentation_loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def segment(net, inputs):
        image, labels = inputs
        output = net(image)
        output = output[0] if isinstance(output, list) else output  # deep supervision: full size
        return segmentation_loss(output.float(), labels)

    return {"voxelmorph (1 pair 64x80x64)": (voxelmorph, pair, register),
            "nnunet DynUNet (2 x 80x80x64)": (dynunet, patches, segment)}


def step_seconds(net, inputs, loss, dtype, optimiser) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        value = loss(net, inputs)
    optimiser.zero_grad(set_to_none=True)
    value.backward()
    optimiser.step()
    return time.perf_counter() - start


def inference_seconds(net, inputs, dtype) -> float:
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        net(*inputs[:2]) if len(inputs) == 3 else net(inputs[0])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from medpipe.device import cpu_has_native_bf16

    repeats = 1 if SMOKE else 2 if args.quick else 4
    rows, table = [], []
    for name, (net, inputs, loss) in networks().items():
        optimiser = torch.optim.SGD(net.parameters(), lr=1e-4)
        times = {"fp32": {"train": [], "infer": []}, "bf16": {"train": [], "infer": []}}
        step_seconds(net, inputs, loss, None, optimiser)  # warm-up, both precisions
        step_seconds(net, inputs, loss, torch.bfloat16, optimiser)
        for _ in range(repeats):
            for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                net.train()
                times[label]["train"].append(step_seconds(net, inputs, loss, dtype, optimiser))
                net.eval()
                times[label]["infer"].append(inference_seconds(net, inputs, dtype))
        best = {label: {kind: min(values) for kind, values in kinds.items()}
                for label, kinds in times.items()}
        row = {"network": name, "seconds": best,
               "train_speedup": best["fp32"]["train"] / best["bf16"]["train"],
               "inference_speedup": best["fp32"]["infer"] / best["bf16"]["infer"]}
        rows.append(row)
        table.append([name, best["fp32"]["train"], best["bf16"]["train"], row["train_speedup"],
                      best["fp32"]["infer"], best["bf16"]["infer"], row["inference_speedup"]])
        print(row, flush=True)
    write_results("autocast_cpu", {"quick": args.quick, "native_bf16": cpu_has_native_bf16(),
                                   "rows": rows},
                  ["network", "fp32 s/step", "bf16 s/step", "step speed-up", "fp32 s/infer",
                   "bf16 s/infer", "inference speed-up"], table,
                  notes="Fastest of alternating repeats; bf16 = torch.autocast('cpu', "
                        "torch.bfloat16), what medpipe uses on a CPU with native bf16.")


if __name__ == "__main__":
    main()
