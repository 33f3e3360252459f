rule verify_dataset:
    input:
        f"{DATASET}/dataset.json",
    output:
        f"{RESULTS}/verify.json",
    log:
        f"{RESULTS}/logs/verify_dataset.log",
    benchmark:
        f"{RESULTS}/benchmarks/verify_dataset.tsv"
    params:
        dataset=subpath(input[0], parent=True),
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "medpipe verify {params.dataset:q} --json {output:q} --workers {threads:q} > {log:q} 2>&1"


rule split_dataset:
    input:
        f"{RESULTS}/verify.json",
    output:
        f"{RESULTS}/splits.json",
    log:
        f"{RESULTS}/logs/split_dataset.log",
    params:
        dataset=DATASET,
        folds=config["folds"],
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "medpipe split {params.dataset:q} -o {output:q} --folds {params.folds:q} > {log:q} 2>&1"
