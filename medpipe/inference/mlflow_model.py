"""The MLflow pyfunc model of a medpipe run, logged "from code" (MLflow 3): this file is
stored with the model and run on load, so nothing is pickled. The model's artifact `run`
holds the run folder's files (model.json, plans.json, config.json, the `best` checkpoint);
`load_context` builds the segmenter or registrator from them. (Besides `tracking.py`, the
one module that imports MLflow: it is MLflow's model code, run only by MLflow.)

`predict` takes a table of file paths and writes results next to what it names:
segmentation columns `image`, `output`; registration columns `moving`, `fixed`, `output`
(a folder), optional `moving_labels`. It returns the written paths.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class MedpipeModel(PythonModel):
    def load_context(self, context) -> None:
        from medpipe.runs.folder import RunFolder
        from medpipe.runs.spec import read_run_spec

        folder = Path(context.artifacts["run"])
        self.task = read_run_spec(RunFolder(folder)).task
        if self.task == "registration":
            from medpipe.inference.registrator import load_registrator

            self.model = load_registrator(folder)
        else:
            from medpipe.inference.segmenter import load_segmenter

            self.model = load_segmenter(folder)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        written = []
        for row in model_input.to_dict("records"):
            if self.task == "registration":
                result = self.model.register(row["moving"], row["fixed"],
                                             row.get("moving_labels") or None)
                written.append(str(result.write(row["output"])["warped"].parent))
            else:
                written.append(str(self.model.predict_files([row["image"]],
                                                            [row["output"]])[0]))
        return pd.DataFrame({"output": written})


mlflow.models.set_model(MedpipeModel())
