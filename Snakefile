# medpipe workflow: every rule calls the `medpipe` command; this file only wires stages.
#   snakemake --cores 2 --configfile configs/demo.yaml preprocess_all
import copy

from snakemake.utils import min_version, validate

min_version("8.0")

# The pipeline config comes from the command line (--configfile), never merged with a
# default file: the `medpipe` commands read that one file, so Snakemake must see the same.
if not workflow.overwrite_configfiles:
    raise WorkflowError("give the pipeline config: snakemake --configfile configs/demo.yaml ...")


# each model's entry as written (the schema fills in every default), for the settings a
# training depends on: a model given an entry of its own must not look changed by that alone
MODEL_ENTRIES = copy.deepcopy(config.get("models") or {})
validate(config, "configs/schema.yaml")

# every rule can run inside the medpipe image (the Apptainer recipe in containers/ builds
# medpipe.sif):
# used only with --software-deployment-method apptainer (--apptainer-args="--nv" for GPUs);
# `container:` in the config names another image
container: config.get("container") or "medpipe.sif"


# `snakemake --report report.html`: the workflow, its runtimes and the comparison report
report: "workflow/report/workflow.rst"


# the config file the `medpipe` commands read (dataset/results are passed explicitly, as
# `--config dataset=... results=...` on the command line may override them)
CONFIG_FILE = workflow.overwrite_configfiles[-1]
DATASET = config["dataset"]
RESULTS = config["results"]
CONFIGURATION = config["configuration"]
SEG_MODELS = config["segmentation_models"]
REG_MODELS = config["registration"]["models"]
REG_BASELINES = config["registration"]["baselines"]
# each network with instance optimisation, scored as its own method
REG_REFINED = ([f"{name}_io" for name in REG_MODELS]
               if config["registration"]["instance_optimisation"]["steps"] > 0 else [])


include: "workflow/rules/common.smk"


CASES = glob_wildcards(f"{DATASET}/labelsTr/{{case}}{dataset_file_ending(DATASET)}").case
TEST_CASES = glob_wildcards(
    f"{DATASET}/imagesTs/{{case}}_0000{dataset_file_ending(DATASET)}").case
TEST_LABELS = glob_wildcards(f"{DATASET}/labelsTs/{{case}}{dataset_file_ending(DATASET)}").case
# training scans without labels: preprocessed like the others, learnt from by the registration
# networks only (registration.unlabelled)
UNLABELLED_CASES = glob_wildcards(
    f"{DATASET}/imagesTrUnlabelled/{{case}}_0000{dataset_file_ending(DATASET)}").case
REG_UNLABELLED = UNLABELLED_CASES if config["registration"].get("unlabelled", True) else []
# registration.eval_cases: test scores registration on pairs of the labelled test cases,
# which are then preprocessed like the training cases
REG_TEST_CASES = (sorted(set(TEST_CASES) & set(TEST_LABELS))
                  if config["registration"].get("eval_cases") == "test" else [])


# the training runs of each model (`seeds` x `train_folds`): the first seed's are fold_K,
# the others seed_S/fold_K; with more than one run per segmentation model each run also
# scores the labelled test cases (its own evaluation_test/), so that runs pair on the same cases
RUNS = {model: training_runs(model) for model in SEG_MODELS + REG_MODELS}
SEG_TEST_RUNS = {model: RUNS[model] if len(RUNS[model]) > 1 and TEST_CASES and TEST_LABELS
                 else [] for model in SEG_MODELS}
SEG_TEST_CASES = (sorted(set(TEST_CASES) & set(TEST_LABELS))
                  if any(SEG_TEST_RUNS.values()) else [])


include: "workflow/rules/data.smk"
include: "workflow/rules/planning.smk"
include: "workflow/rules/segmentation.smk"
include: "workflow/rules/registration.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        f"{RESULTS}/verify.json",
        f"{RESULTS}/splits.json",
        f"{RESULTS}/plans.json",
        expand(f"{RESULTS}/preprocessed/{CONFIGURATION}/{{case}}.npz", case=CASES),
        rules.segmentation_all.input,
        rules.registration_all.input,
        rules.compare.output,
