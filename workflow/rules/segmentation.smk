# Train each segmentation model on each fold, then score it on the fold's validation cases
# and predict the dataset's test images (imagesTs), when it has some, scored against labelsTs
# where those exist.
# Training resumes from its last checkpoint when re-run after a crash: the rule's output is
# the summary written at the very end, so Snakemake never deletes the checkpoints.
# Every command is told its results folder (the one holding plans.json) and its run folder
# (the one holding training.json) explicitly.


rule train_segmentation:
    input:
        plans=f"{RESULTS}/plans.json",
        splits=f"{RESULTS}/splits.json",
        cases=expand(f"{RESULTS}/preprocessed/{CONFIGURATION}/{{case}}.npz", case=CASES),
    output:
        f"{RESULTS}/runs/{{model}}/fold_{{fold}}/training.json",
    log:
        f"{RESULTS}/logs/train_segmentation/{{model}}_fold_{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_segmentation/{{model}}_fold_{{fold}}.tsv"
    wildcard_constraints:
        model=one_of(SEG_MODELS),
    params:
        config_file=CONFIG_FILE,
        paths=PATH_OVERRIDES,
        run_dir=subpath(output[0], parent=True),
        settings=training_settings,
    threads: 2
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=1,
    shell:
        "medpipe train-seg --config {params.config_file:q} {params.paths:q}"
        " --model {wildcards.model:q} --fold {wildcards.fold:q}"
        " --run-dir {params.run_dir:q} --restart-if-changed > {log:q} 2>&1"


rule evaluate_segmentation:
    input:
        plans=f"{RESULTS}/plans.json",
        training=f"{RESULTS}/runs/{{model}}/fold_{{fold}}/training.json",
    output:
        f"{RESULTS}/runs/{{model}}/fold_{{fold}}/evaluation/summary.json",
    log:
        f"{RESULTS}/logs/evaluate_segmentation/{{model}}_fold_{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_segmentation/{{model}}_fold_{{fold}}.tsv"
    wildcard_constraints:
        model=one_of(SEG_MODELS),
    params:
        config_file=CONFIG_FILE,
        paths=PATH_OVERRIDES,
        run_dir=subpath(input.training, parent=True),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    shell:
        "medpipe evaluate-seg --config {params.config_file:q} {params.paths:q}"
        " --model {wildcards.model:q} --fold {wildcards.fold:q}"
        " --run-dir {params.run_dir:q} > {log:q} 2>&1"


rule predict_test_cases:
    input:
        training=f"{RESULTS}/runs/{{model}}/fold_{{fold}}/training.json",
    output:
        directory(f"{RESULTS}/runs/{{model}}/fold_{{fold}}/test_predictions"),
    log:
        f"{RESULTS}/logs/predict_test_cases/{{model}}_fold_{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict_test_cases/{{model}}_fold_{{fold}}.tsv"
    wildcard_constraints:
        model=one_of(SEG_MODELS),
    params:
        images=f"{DATASET}/imagesTs",
        run_dir=subpath(input.training, parent=True),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    shell:
        "medpipe predict --model {params.run_dir:q} -i {params.images:q} -o {output:q}"
        " > {log:q} 2>&1"


rule evaluate_test_cases:
    input:
        f"{RESULTS}/runs/{{model}}/fold_{{fold}}/test_predictions",
    output:
        f"{RESULTS}/runs/{{model}}/fold_{{fold}}/test_evaluation/summary.json",
    log:
        f"{RESULTS}/logs/evaluate_test_cases/{{model}}_fold_{{fold}}.log",
    wildcard_constraints:
        model=one_of(SEG_MODELS),
    params:
        references=f"{DATASET}/labelsTs",
        dataset=DATASET,
        folder=subpath(output[0], parent=True),
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "medpipe evaluate-folder {params.references:q} {input:q} --dataset {params.dataset:q}"
        " -o {params.folder:q} > {log:q} 2>&1"


rule segmentation_all:
    input:
        expand(
            f"{RESULTS}/runs/{{model}}/fold_{{fold}}/evaluation/summary.json",
            model=SEG_MODELS,
            fold=config["train_folds"],
        ),
        expand(
            f"{RESULTS}/runs/{{model}}/fold_{{fold}}/test_predictions",
            model=SEG_MODELS if TEST_CASES else [],
            fold=config["train_folds"],
        ),
        expand(
            f"{RESULTS}/runs/{{model}}/fold_{{fold}}/test_evaluation/summary.json",
            model=SEG_MODELS if TEST_CASES and TEST_LABELS else [],
            fold=config["train_folds"],
        ),
