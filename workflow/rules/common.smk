# Helpers the rules share: the dataset's file ending, wildcard constraints for model lists,
# and the config settings each job depends on (a change reruns that job and what follows).
import json
import re
from pathlib import Path


# registration settings that change what a network learns (not which methods are compared)
REG_EVALUATION_ONLY = {"models", "baselines", "eval_pairs", "eval_cases", "ants",
                       "instance_optimisation"}


# the dataset and results folders for the `medpipe` commands' `--set`, which parses values as
# YAML: a JSON string is a YAML string, so a path holding `: `, ` #` or quotes stays one
# path; the rules interpolate it with `:q`, which shell-quotes each word
PATH_OVERRIDES = ["--set", f"dataset={json.dumps(str(DATASET))}",
                  "--set", f"results={json.dumps(str(RESULTS))}"]


def dataset_file_ending(dataset):
    """The file ending the dataset's own dataset.json states (one source of truth)."""
    path = Path(dataset) / "dataset.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["file_ending"]
    except (OSError, ValueError, KeyError) as error:
        raise WorkflowError(f"{path}: cannot read the dataset's file_ending ({error}); "
                            f"check it with `medpipe verify {dataset}`")


def one_of(names):
    """A wildcard constraint matching exactly NAMES, and nothing when there are none."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


# a training run's folder below RESULTS/runs/MODEL: fold_K (the first seed) or seed_S/fold_K
RUN_PATTERN = r"(seed_\d+/)?fold_\d+"
# models built from a residual-encoder planner's plans (medpipe's ModelSpec.needs_residual_plans;
# a test keeps the two equal): with `planner: default` they train on ResEnc M plans beside it
RESIDUAL_MODELS = {"nnunet_resenc"}


def model_seeds(model):
    """MODEL's training seeds: its own `models.MODEL.seeds`, else the shared `seeds`."""
    return (config["models"].get(model, {}).get("seeds") or config.get("seeds") or [0])


def training_runs(model):
    """MODEL's run folders below RESULTS/runs/MODEL, one per seed and trained fold."""
    return [f"fold_{fold}" if index == 0 else f"seed_{seed}/fold_{fold}"
            for index, seed in enumerate(model_seeds(model)) for fold in config["train_folds"]]


def run_fold(wildcards):
    """The fold of the run folder named by the RUN wildcard."""
    return wildcards.run.rsplit("fold_", 1)[1]


def run_seed(wildcards):
    """The seed of the RUN wildcard's folder: seed_S's, or the model's first."""
    head = wildcards.run.split("/")[0]
    return int(head[len("seed_"):]) if head.startswith("seed_") else model_seeds(
        wildcards.model)[0]


def seed_override(wildcards):
    """`--set` of the run's seed for the `medpipe train-*` / `evaluate-*` commands."""
    return ["--set", f"models.{wildcards.model}.training.seed={run_seed(wildcards)}"]


def model_planner(model):
    """The planner MODEL trains with (medpipe's PipelineConfig.planner_for)."""
    chosen = config["models"].get(model, {}).get("planner")
    if chosen:
        return chosen
    if model in RESIDUAL_MODELS and config["planner"] == "default":
        return "ResEncM"
    return config["planner"]


def model_plans(wildcards):
    """MODEL's plans file: plans.json, or plans_PLANNER.json beside it."""
    planner = model_planner(wildcards.model)
    return (f"{RESULTS}/plans.json" if planner == config["planner"]
            else f"{RESULTS}/plans_{planner}.json")


def training_settings(wildcards):
    """What a model's training depends on in the config, as a param: when it changes,
    Snakemake reruns the training (and all after it), and medpipe starts that run afresh."""
    registration = {k: v for k, v in config["registration"].items()
                    if k not in REG_EVALUATION_ONLY}
    return json.dumps({
        "configuration": CONFIGURATION, "training": config["training"],
        # its entry as written, less `seeds`, which says which runs exist, not how one trains
        # (adding a seed must not retrain the others): the run's own seed is below
        "model": {k: v for k, v in MODEL_ENTRIES.get(wildcards.model, {}).items()
                  if k != "seeds"},
        "recipe": config.get("recipe", "shared"), "seed": run_seed(wildcards),
        "planner": model_planner(wildcards.model),
        "registration": registration if wildcards.model in REG_MODELS else None,
    }, sort_keys=True)


def evaluation_settings(wildcards):
    """What a registration evaluation depends on besides the trained network."""
    return json.dumps({k: config["registration"][k] for k in (
        "atlas", "eval_pairs", "eval_cases", "classical", "ants", "instance_optimisation")},
        sort_keys=True)


def training_processes(wildcards, resources):
    """Processes a training job runs (`medpipe train-* --processes`, DDP over torchrun): one
    per GPU the job was given (a profile's `gpu` resource), else one."""
    return max(1, int(resources.get("gpu", 1) or 1))
