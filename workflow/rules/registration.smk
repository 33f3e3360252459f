# Train each registration network on each fold; score the networks and the baselines
# (identity, classical SimpleITK) on the fold's held-out pairs. Like segmentation, training
# resumes from its last checkpoint: the rule's output is the summary written at the end.

REGISTRATION = config.get("registration", {})
REG_MODELS = REGISTRATION.get("models", ["voxelmorph", "voxelmorph_diff"])
REG_BASELINES = REGISTRATION.get("baselines", ["identity", "classical"])


rule train_registration:
    input:
        plans=f"{RESULTS}/plans.json",
        splits=f"{RESULTS}/splits.json",
        cases=expand(f"{RESULTS}/preprocessed/{CONFIGURATION}/{{case}}.npz", case=CASES),
    output:
        f"{RESULTS}/runs/{{model}}/fold_{{fold}}/training.json",
    log:
        f"{RESULTS}/logs/train_registration/{{model}}_fold_{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_registration/{{model}}_fold_{{fold}}.tsv"
    wildcard_constraints:
        model="|".join(REG_MODELS),
    params:
        config_file=CONFIG_FILE,
        dataset=DATASET,
        results=lambda wildcards, output: Path(output[0]).parents[3],
    threads: 2
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=1,
    shell:
        "medpipe train-reg --config {params.config_file} --set dataset={params.dataset}"
        " --set results={params.results} --model {wildcards.model} --fold {wildcards.fold}"
        " > {log} 2>&1"


rule evaluate_registration_network:
    input:
        f"{RESULTS}/runs/{{model}}/fold_{{fold}}/training.json",
    output:
        f"{RESULTS}/runs/{{model}}/fold_{{fold}}/evaluation/summary.json",
    log:
        f"{RESULTS}/logs/evaluate_registration/{{model}}_fold_{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_registration/{{model}}_fold_{{fold}}.tsv"
    wildcard_constraints:
        model="|".join(REG_MODELS),
    params:
        config_file=CONFIG_FILE,
        dataset=DATASET,
        results=lambda wildcards, output: Path(output[0]).parents[4],
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    shell:
        "medpipe evaluate-reg --config {params.config_file} --set dataset={params.dataset}"
        " --set results={params.results} --model {wildcards.model} --fold {wildcards.fold}"
        " > {log} 2>&1"


rule evaluate_registration_baseline:
    input:
        plans=f"{RESULTS}/plans.json",
        splits=f"{RESULTS}/splits.json",
        cases=expand(f"{RESULTS}/preprocessed/{CONFIGURATION}/{{case}}.npz", case=CASES),
    output:
        f"{RESULTS}/runs/{{baseline}}/fold_{{fold}}/evaluation/summary.json",
    log:
        f"{RESULTS}/logs/evaluate_registration/{{baseline}}_fold_{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_registration/{{baseline}}_fold_{{fold}}.tsv"
    wildcard_constraints:
        baseline="identity|classical",
    params:
        config_file=CONFIG_FILE,
        dataset=DATASET,
        results=lambda wildcards, output: Path(output[0]).parents[4],
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "medpipe evaluate-reg --config {params.config_file} --set dataset={params.dataset}"
        " --set results={params.results} --model {wildcards.baseline} --fold {wildcards.fold}"
        " > {log} 2>&1"


rule registration_all:
    input:
        expand(
            f"{RESULTS}/runs/{{model}}/fold_{{fold}}/evaluation/summary.json",
            model=REG_MODELS + REG_BASELINES,
            fold=config["train_folds"],
        ),
