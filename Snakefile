# medpipe workflow: every rule calls the `medpipe` command; this file only wires stages.
#   snakemake --cores 2 --configfile configs/demo.yaml preprocess_all
from snakemake.utils import min_version, validate

min_version("8.0")


configfile: "configs/demo.yaml"


validate(config, "configs/schema.yaml")

# the config file the `medpipe` commands read (dataset/results are passed explicitly, as
# `--config dataset=... results=...` on the command line may override them)
CONFIG_FILE = workflow.configfiles[-1]
DATASET = config["dataset"]
RESULTS = config["results"]
CONFIGURATION = config["configuration"]
CASES = glob_wildcards(f"{DATASET}/labelsTr/{{case}}{config['file_ending']}").case


include: "workflow/rules/data.smk"
include: "workflow/rules/planning.smk"
include: "workflow/rules/segmentation.smk"
include: "workflow/rules/registration.smk"


rule all:
    input:
        f"{RESULTS}/verify.json",
        f"{RESULTS}/splits.json",
        f"{RESULTS}/plans.json",
        expand(f"{RESULTS}/preprocessed/{CONFIGURATION}/{{case}}.npz", case=CASES),
        rules.segmentation_all.input,
        rules.registration_all.input,
