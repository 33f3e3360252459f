# Train each segmentation model on each fold (once per seed), then score it on the fold's
# validation cases (and, with repeated runs, each run on the labelled test cases);
# nnU-Net's postprocessing (keep the largest component where that raised the validation
# Dice) is decided on the folds' validation predictions; then each model's trained folds
# together (the fold ensemble) predict the dataset's test images
# (imagesTs), when it has some, into RESULTS/test/MODEL/predictions, scored against labelsTs
# where those exist (RESULTS/test/MODEL/evaluation: what the comparison reports).
# Training resumes from its last checkpoint when re-run after a crash: the rule's output is
# the summary written at the very end, so Snakemake never deletes the checkpoints.
# Every command is told its results folder (the one holding plans.json) and its run folder
# (the one holding training.json) explicitly.


rule train_segmentation:
    input:
        plans=f"{RESULTS}/plans.json",
        model_plans=model_plans,
        splits=f"{RESULTS}/splits.json",
        cases=expand(f"{RESULTS}/preprocessed/{CONFIGURATION}/{{case}}.npz", case=CASES),
    output:
        f"{RESULTS}/runs/{{model}}/{{run}}/training.json",
    log:
        f"{RESULTS}/logs/train_segmentation/{{model}}_{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_segmentation/{{model}}_{{run}}.tsv"
    wildcard_constraints:
        model=one_of(SEG_MODELS),
        run=RUN_PATTERN,
    params:
        config_file=CONFIG_FILE,
        paths=PATH_OVERRIDES,
        seed=seed_override,
        fold=run_fold,
        run_dir=subpath(output[0], parent=True),
        settings=training_settings,
        processes=training_processes,
    threads: 2
    resources:
        mem_mb=16000,
        runtime=24 * 60,
    shell:
        "medpipe train-seg --config {params.config_file:q} {params.paths:q} {params.seed:q}"
        " --model {wildcards.model:q} --fold {params.fold:q}"
        " --run-dir {params.run_dir:q} --restart-if-changed --processes {params.processes}"
        " > {log:q} 2>&1"


rule evaluate_segmentation:
    input:
        plans=f"{RESULTS}/plans.json",
        training=f"{RESULTS}/runs/{{model}}/{{run}}/training.json",
    output:
        f"{RESULTS}/runs/{{model}}/{{run}}/evaluation/summary.json",
    log:
        f"{RESULTS}/logs/evaluate_segmentation/{{model}}_{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_segmentation/{{model}}_{{run}}.tsv"
    wildcard_constraints:
        model=one_of(SEG_MODELS),
        run=RUN_PATTERN,
    params:
        config_file=CONFIG_FILE,
        paths=PATH_OVERRIDES,
        seed=seed_override,
        fold=run_fold,
        run_dir=subpath(input.training, parent=True),
        cases=[],  # the fold's validation cases
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "medpipe evaluate-seg --config {params.config_file:q} {params.paths:q} {params.seed:q}"
        " --model {wildcards.model:q} --fold {params.fold:q} {params.cases:q}"
        " --run-dir {params.run_dir:q} > {log:q} 2>&1"


# repeated runs (several seeds or folds): each run also scores the labelled test cases
# itself, so that the report pairs every run of every model on the same cases
use rule evaluate_segmentation as evaluate_segmentation_test with:
    input:
        plans=f"{RESULTS}/plans.json",
        training=f"{RESULTS}/runs/{{model}}/{{run}}/training.json",
        test_cases=expand(f"{RESULTS}/preprocessed/{CONFIGURATION}/{{case}}.npz",
                          case=SEG_TEST_CASES),
    output:
        f"{RESULTS}/runs/{{model}}/{{run}}/evaluation_test/summary.json",
    log:
        f"{RESULTS}/logs/evaluate_segmentation_test/{{model}}_{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_segmentation_test/{{model}}_{{run}}.tsv"
    params:
        cases=["--cases", "test"],


rule determine_postprocessing:
    input:
        expand(f"{RESULTS}/runs/{{{{model}}}}/fold_{{fold}}/evaluation/summary.json",
               fold=config["train_folds"]),
    output:
        f"{RESULTS}/runs/{{model}}/postprocessing.json",
    log:
        f"{RESULTS}/logs/determine_postprocessing/{{model}}.log",
    wildcard_constraints:
        model=one_of(SEG_MODELS),
    params:
        model_dir=subpath(output[0], parent=True),
        dataset=DATASET,
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "medpipe postprocessing {params.model_dir:q} --dataset {params.dataset:q} > {log:q} 2>&1"


rule predict_test_set:
    input:
        training=expand(f"{RESULTS}/runs/{{{{model}}}}/fold_{{fold}}/training.json",
                        fold=config["train_folds"]),
        postprocessing=f"{RESULTS}/runs/{{model}}/postprocessing.json",
    output:
        directory(f"{RESULTS}/test/{{model}}/predictions"),
    log:
        f"{RESULTS}/logs/predict_test_set/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict_test_set/{{model}}.tsv"
    wildcard_constraints:
        model=one_of(SEG_MODELS),
    params:
        images=f"{DATASET}/imagesTs",
        # every trained fold of the model: `predict` averages their probabilities (nnU-Net's
        # fold ensemble); one fold trained, that fold alone
        model_dir=subpath(input.postprocessing, parent=True),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "medpipe predict --model {params.model_dir:q} -i {params.images:q} -o {output:q}"
        " --postprocessing {input.postprocessing:q} > {log:q} 2>&1"


rule evaluate_test_set:
    input:
        f"{RESULTS}/test/{{model}}/predictions",
    output:
        f"{RESULTS}/test/{{model}}/evaluation/summary.json",
    log:
        f"{RESULTS}/logs/evaluate_test_set/{{model}}.log",
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
        [f"{RESULTS}/runs/{model}/{run}/evaluation/summary.json"
         for model in SEG_MODELS for run in RUNS[model]],
        [f"{RESULTS}/runs/{model}/{run}/evaluation_test/summary.json"
         for model in SEG_MODELS for run in SEG_TEST_RUNS[model]],
        expand(f"{RESULTS}/test/{{model}}/predictions", model=SEG_MODELS if TEST_CASES else []),
        expand(f"{RESULTS}/test/{{model}}/evaluation/summary.json",
               model=SEG_MODELS if TEST_CASES and TEST_LABELS else []),
