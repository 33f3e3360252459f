# One report across every model, built from the MLflow runs the other rules logged; it is
# also the result `snakemake --report report.html` shows.


rule compare:
    input:
        rules.segmentation_all.input,
        rules.registration_all.input,
        plans=f"{RESULTS}/plans.json",
    output:
        html=report(f"{RESULTS}/compare/report.html", caption="../report/compare.rst",
                    category="Comparison"),
        markdown=f"{RESULTS}/compare/report.md",
        summary=f"{RESULTS}/compare/summary.json",
    log:
        f"{RESULTS}/logs/compare.log",
    params:
        config_file=CONFIG_FILE,
        dataset=DATASET,
        results=subpath(input.plans, parent=True),  # the folder that holds plans.json
        folder=subpath(output.html, parent=True),
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "medpipe compare --config {params.config_file} --set dataset={params.dataset}"
        " --set results={params.results} -o {params.folder} > {log} 2>&1"
