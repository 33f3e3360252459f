# Train each registration network on each fold (once per seed); score the networks, each network with
# instance optimisation (NETWORK_io, when registration.instance_optimisation.steps > 0) and
# the baselines (identity, classical SimpleITK, ANTs SyN) on the fold's validation pairs or, with
# registration.eval_cases: test, on pairs of the labelled test cases. Like segmentation, training
# resumes from its last checkpoint: the rule's output is the summary written at the end.
# The model lists (REG_MODELS, REG_BASELINES, set in the Snakefile) default to the schema's
# (medpipe.config.RegistrationConfig).


rule train_registration:
    input:
        plans=f"{RESULTS}/plans.json",
        splits=f"{RESULTS}/splits.json",
        cases=expand(f"{RESULTS}/preprocessed/{CONFIGURATION}/{{case}}.npz",
                     case=CASES + REG_UNLABELLED),
    output:
        f"{RESULTS}/runs/{{model}}/{{run}}/training.json",
    log:
        f"{RESULTS}/logs/train_registration/{{model}}_{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_registration/{{model}}_{{run}}.tsv"
    wildcard_constraints:
        model=one_of(REG_MODELS),
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
        "medpipe train-reg --config {params.config_file:q} {params.paths:q} {params.seed:q}"
        " --model {wildcards.model:q} --fold {params.fold:q}"
        " --run-dir {params.run_dir:q} --restart-if-changed --processes {params.processes}"
        " > {log:q} 2>&1"


rule evaluate_registration_network:
    input:
        plans=f"{RESULTS}/plans.json",
        training=f"{RESULTS}/runs/{{model}}/{{run}}/training.json",
        test_cases=expand(f"{RESULTS}/preprocessed/{CONFIGURATION}/{{case}}.npz",
                          case=REG_TEST_CASES),
    output:
        f"{RESULTS}/runs/{{model}}/{{run}}/evaluation/summary.json",
    log:
        f"{RESULTS}/logs/evaluate_registration/{{model}}_{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_registration/{{model}}_{{run}}.tsv"
    wildcard_constraints:
        model=one_of(REG_MODELS),
        run=RUN_PATTERN,
    params:
        config_file=CONFIG_FILE,
        paths=PATH_OVERRIDES,
        seed=seed_override,
        fold=run_fold,
        run_dir=subpath(input.training, parent=True),
        settings=evaluation_settings,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "medpipe evaluate-reg --config {params.config_file:q} {params.paths:q} {params.seed:q}"
        " --model {wildcards.model:q} --fold {params.fold:q}"
        " --run-dir {params.run_dir:q} > {log:q} 2>&1"


rule evaluate_registration_refined:
    input:
        plans=f"{RESULTS}/plans.json",
        training=f"{RESULTS}/runs/{{model}}/fold_{{fold}}/training.json",
        test_cases=expand(f"{RESULTS}/preprocessed/{CONFIGURATION}/{{case}}.npz",
                          case=REG_TEST_CASES),
    output:
        f"{RESULTS}/runs/{{model}}_io/fold_{{fold}}/evaluation/summary.json",
    log:
        f"{RESULTS}/logs/evaluate_registration/{{model}}_io_fold_{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_registration/{{model}}_io_fold_{{fold}}.tsv"
    wildcard_constraints:
        model=one_of(REG_MODELS),
    params:
        config_file=CONFIG_FILE,
        paths=PATH_OVERRIDES,
        network_dir=subpath(input.training, parent=True),
        run_dir=subpath(output[0], ancestor=2),  # RUN/evaluation/summary.json
        settings=evaluation_settings,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "medpipe evaluate-reg --config {params.config_file:q} {params.paths:q}"
        " --model {wildcards.model:q}_io --fold {wildcards.fold:q}"
        " --run-dir {params.run_dir:q} --network-dir {params.network_dir:q} > {log:q} 2>&1"


rule evaluate_registration_baseline:
    input:
        plans=f"{RESULTS}/plans.json",
        splits=f"{RESULTS}/splits.json",
        cases=expand(f"{RESULTS}/preprocessed/{CONFIGURATION}/{{case}}.npz",
                     case=CASES + REG_TEST_CASES),
    output:
        f"{RESULTS}/runs/{{baseline}}/fold_{{fold}}/evaluation/summary.json",
    log:
        f"{RESULTS}/logs/evaluate_registration/{{baseline}}_fold_{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_registration/{{baseline}}_fold_{{fold}}.tsv"
    wildcard_constraints:
        baseline=one_of(REG_BASELINES),
    params:
        config_file=CONFIG_FILE,
        paths=PATH_OVERRIDES,
        run_dir=subpath(output[0], ancestor=2),  # RUN/evaluation/summary.json
        settings=evaluation_settings,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "medpipe evaluate-reg --config {params.config_file:q} {params.paths:q}"
        " --model {wildcards.baseline:q} --fold {wildcards.fold:q}"
        " --run-dir {params.run_dir:q} > {log:q} 2>&1"


rule registration_all:
    input:
        [f"{RESULTS}/runs/{model}/{run}/evaluation/summary.json"
         for model in REG_MODELS for run in RUNS[model]],
        expand(
            f"{RESULTS}/runs/{{model}}/fold_{{fold}}/evaluation/summary.json",
            model=REG_REFINED + REG_BASELINES,
            fold=config["train_folds"],
        ),
