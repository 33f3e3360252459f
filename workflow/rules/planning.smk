rule extract_fingerprint:
    input:
        f"{RESULTS}/verify.json",
    output:
        f"{RESULTS}/fingerprint.json",
    log:
        f"{RESULTS}/logs/extract_fingerprint.log",
    benchmark:
        f"{RESULTS}/benchmarks/extract_fingerprint.tsv"
    params:
        dataset=DATASET,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "medpipe fingerprint {params.dataset:q} -o {output:q} --workers {threads:q} > {log:q} 2>&1"


rule plan_experiment:
    input:
        f"{RESULTS}/fingerprint.json",
    output:
        f"{RESULTS}/plans.json",
    log:
        f"{RESULTS}/logs/plan_experiment.log",
    params:
        planner=config["planner"],
        # a list: `:q` quotes each word (an empty list adds nothing)
        gpu_memory=(["--gpu-memory-gb", str(config["gpu_memory_gb"])]
                    if config.get("gpu_memory_gb") is not None else []),
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "medpipe plan {input:q} -o {output:q} --planner {params.planner:q} {params.gpu_memory:q}"
        " > {log:q} 2>&1"


# a model that trains with another planner's plans (nnunet_resenc: ResEnc M beside default
# plans) gets them beside plans.json, over the same fingerprint and preprocessed cases
use rule plan_experiment as plan_experiment_for_model with:
    output:
        f"{RESULTS}/plans_{{planner}}.json",
    log:
        f"{RESULTS}/logs/plan_experiment_{{planner}}.log",
    wildcard_constraints:
        planner="default|ResEncM|ResEncL|ResEncXL",
    params:
        planner=lambda wildcards: wildcards.planner,
        gpu_memory=(["--gpu-memory-gb", str(config["gpu_memory_gb"])]
                    if config.get("gpu_memory_gb") is not None else []),


rule preprocess_case:
    input:
        plans=f"{RESULTS}/plans.json",
    output:
        data=f"{RESULTS}/preprocessed/{{configuration}}/{{case}}.npz",
        properties=f"{RESULTS}/preprocessed/{{configuration}}/{{case}}.json",
    log:
        f"{RESULTS}/logs/preprocess_case/{{configuration}}/{{case}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/preprocess_case/{{configuration}}/{{case}}.tsv"
    params:
        dataset=DATASET,
        folder=subpath(output.data, parent=True),
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "medpipe preprocess {params.dataset:q} {input.plans:q} --config {wildcards.configuration:q}"
        " -o {params.folder:q} --case {wildcards.case:q}"
        " > {log:q} 2>&1"


rule preprocess_all:
    input:
        expand(f"{RESULTS}/preprocessed/{CONFIGURATION}/{{case}}.npz",
               case=CASES + REG_UNLABELLED),
