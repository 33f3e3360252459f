"""What every benchmark shares: the machine it ran on, a prepared demo dataset, peak memory
of one measurement, and writing JSON + a Markdown table.

Peak memory on a CPU is the resident set size sampled during the measurement (`measured`:
its peak and how much it added to the process). A process keeps memory it freed and a later
measurement can reuse it and read low, so scripts give each model a fresh process
(`in_fresh_process`). On a GPU it is torch's peak allocation.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# where JSON and tables go: bench/results (committed) unless MEDPIPE_BENCH_RESULTS says
RESULTS = Path(os.environ.get("MEDPIPE_BENCH_RESULTS")
               or Path(__file__).resolve().parent / "results")
WORK = Path(os.environ.get("MEDPIPE_BENCH_WORK") or Path(__file__).resolve().parent / "work")
# a smoke run (tests/test_bench_smoke.py, in `make test`): every script once at its tiniest
# size, on a prepared tiny dataset (MEDPIPE_BENCH_DATA: a folder with config.yaml, raw/ and
# results/) instead of the demo's, nothing timed that matters
SMOKE = os.environ.get("MEDPIPE_BENCH_SMOKE") == "1"
SMOKE_DATA = os.environ.get("MEDPIPE_BENCH_DATA")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def machine() -> dict[str, Any]:
    """The machine a figure was measured on (recorded beside every figure)."""
    import torch

    from medpipe.device import cpu_field, cpu_has_native_bf16, cpu_vector_unit

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_field("model name"),
        "cpu_family_model": f"{cpu_field('cpu family')}/{cpu_field('model')}",  # 23: Zen 1-2
        # the vector units decide CPU speed more than the core count: timings from a CPU
        # without AVX-512 (and so without native bf16) are not comparable to one with it
        "cpu_avx512": cpu_vector_unit() == "AVX-512",
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def rss_mb() -> float:
    """Current resident memory of this process."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak resident memory while a block runs, sampled every 5 ms by a thread (spikes
    shorter than the interval can be missed). `peak_mb`: the process's peak during the
    block; `added_mb`: above what it held when the block began."""

    def __enter__(self) -> PeakMemory:
        import threading

        self.start_mb = self.peak_mb = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())

    @property
    def added_mb(self) -> float:
        return self.peak_mb - self.start_mb


def measured(function: Callable, *args: Any) -> dict[str, Any]:
    """FUNCTION(*ARGS) in this process with `peak_rss_mb` and `added_memory_mb` (see
    `PeakMemory`) added to its result (a dict)."""
    with PeakMemory() as memory:
        result = function(*args)
    out = dict(result) if isinstance(result, dict) else {"result": result}
    out.update(peak_rss_mb=round(memory.peak_mb, 1), added_memory_mb=round(memory.added_mb, 1))
    return out


def fastest(function: Callable[..., Any], *args: Any, repeats: int = 1) -> dict[str, Any]:
    """FUNCTION(*ARGS) timed REPEATS times: `seconds`, the fastest (the call least disturbed
    by other load on a shared machine), and `repeats`, every time."""
    import time

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "repeats": times}


def in_fresh_process(function: Callable, *args: Any) -> Any:
    """FUNCTION(*ARGS) in a new process, for memory figures no earlier measurement has
    touched; FUNCTION must be importable (a module-level function).

    Processes fork from a server that imported torch, MONAI and medpipe once and never ran
    a tensor operation (so no thread pool is inherited): each starts in milliseconds
    instead of the ~7 s a spawned interpreter spends importing them."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=forkserver_context()) as pool:
        return pool.submit(function, *args).result()


def forkserver_context():
    """A forkserver that imported torch, MONAI and medpipe (see `in_fresh_process`)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "monai.networks.nets", "medpipe.training.runs",
                                    "medpipe.inference.segmenter"])
    return context


def demo_pipeline(cases: int = 6, spacing: float = 3.0, name: str | None = None,
                  preprocess: bool = True, seed: int = 0) -> Path:
    """A demo dataset, planned and preprocessed (built once, reused; PREPROCESS=False: the
    raw dataset only), and a config for it (the demo's models and budgets) at
    WORK/NAME/config.yaml. Returns that folder."""
    import yaml

    from medpipe.config import load_config
    from medpipe.data import load_dataset, make_splits, write_splits
    from medpipe.data.demo import DemoSettings, build_demo_dataset
    from medpipe.planning import fingerprint_dataset, plan_experiment, write_plans
    from medpipe.preprocessing import PreprocessingPlan, preprocess_dataset

    if SMOKE_DATA:
        return Path(SMOKE_DATA)
    root = WORK / (name or f"demo_{cases}_{spacing:g}mm")
    config_file = root / "config.yaml"
    if config_file.is_file():
        return root
    raw, results = root / "raw", root / "results"
    build_demo_dataset(raw, DemoSettings(cases=cases, test_cases=0, spacing=spacing, seed=seed))
    if not preprocess:
        config_file.write_text(yaml.safe_dump({"dataset": str(raw), "results": str(results)}),
                               encoding="utf-8")
        return root
    plans = plan_experiment(fingerprint_dataset(raw), 8)
    write_plans(plans, results / "plans.json")
    dataset = load_dataset(raw)
    write_splits(make_splits(dataset.case_ids, min(5, cases), 12345), results / "splits.json")
    classes = sorted(v for v in dataset.spec.label_values if v > 0)
    preprocess_dataset(dataset.training, PreprocessingPlan.from_plans(plans),
                       results / "preprocessed" / "3d_fullres", classes)
    config = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    config.update(dataset=str(raw), results=str(results))
    config["tracking"] = {"enabled": False}
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    load_config(config_file)  # valid
    return root


def resenc_plans(results: Path, raw: Path | None = None) -> Path:
    """RESULTS' ResEnc M plans, where the pipeline trains `nnunet_resenc` from beside the
    default plans.json (`PipelineConfig.plans_file_for`: nnU-Net's ResEnc planners change
    the network, patch and batch, not the preprocessing); planned from the RAW dataset when
    missing."""
    from medpipe.config import PipelineConfig

    plans = PipelineConfig(dataset=raw or results, results=results).plans_file_for(
        "nnunet_resenc")
    if not plans.is_file():
        from medpipe.planning import fingerprint_dataset, plan_experiment, write_plans

        write_plans(plan_experiment(fingerprint_dataset(raw), planner="ResEncM"), plans)
    return plans


def one_step_runs(root: Path, models: Sequence[str], train: Callable) -> Path:
    """ROOT/runs/MODEL/fold_0 for each of MODELS, trained by TRAIN (`train_segmentation` or
    `train_registration`) for a single step, once: what timing a prediction needs (the
    weights do not change its cost)."""
    from medpipe.config import load_config

    runs = root / "runs"
    for model in models:
        if (runs / model / "fold_0" / "training.json").is_file():
            continue
        config = load_config(root / "config.yaml", [
            f"{scope}.{key}=1" for scope in ("training", f"models.{model}.training")
            for key in ("epochs", "iterations_per_epoch", "val_every")])
        train(config, model, 0, runs / model / "fold_0", progress=False)
    return runs


def gpu_peak_mb(device: Any) -> float | None:
    """Torch's peak GPU allocation (the engine's measure), None on a CPU."""
    from medpipe.device import peak_memory_mb

    return peak_memory_mb(device) if device.type == "cuda" else None


def write_results(name: str, data: dict[str, Any], header: Sequence[str],
                  rows: Sequence[Sequence[Any]], notes: str = "") -> Path:
    """bench/results/NAME.json (DATA + the machine) and NAME.md (the table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    lines = [f"### {name}", "", f"Machine: {describe(payload['machine'])}", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    if notes:
        lines += ["", notes]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return path


def describe(info: dict[str, Any]) -> str:
    gpu = info.get("gpu") or "no GPU"
    cpu = info.get("cpu_model") or info["processor"]
    vectors = ("AVX-512" + (" with native bf16" if info.get("cpu_native_bf16") else "")
               if info.get("cpu_avx512") else "no AVX-512, no native bf16")
    return (f"{info['cpu_cores']} CPU cores ({cpu}, {vectors}), {info['memory_gb']} GB, "
            f"{gpu}, torch {info['torch']}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "-" if value is None else str(value)
