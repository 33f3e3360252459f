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
        paths=PATH_OVERRIDES,
        folder=subpath(output.html, parent=True),
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "medpipe compare --config {params.config_file:q} {params.paths:q}"
        " -o {params.folder:q} > {log:q} 2>&1"
