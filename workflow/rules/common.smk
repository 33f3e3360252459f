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


def training_settings(wildcards):
    """What a model's training depends on in the config, as a param: when it changes,
    Snakemake reruns the training (and all after it), and medpipe starts that run afresh."""
    registration = {k: v for k, v in config["registration"].items()
                    if k not in REG_EVALUATION_ONLY}
    return json.dumps({
        "configuration": CONFIGURATION, "training": config["training"],
        "model": config["models"].get(wildcards.model, {}),
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
