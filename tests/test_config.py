"""The pipeline config: validated once when read (every nested section typed), and the
layering of training settings (model defaults < shared `training` < `models.<name>.training`
< `--set`), field by field."""

from __future__ import annotations

import pytest
import yaml

from medpipe.config import load_config
from medpipe.errors import MedpipeError
from medpipe.models import model_spec


def write(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"dataset": "raw", "results": "results", **data}))
    return path


def test_training_layers_merge_field_by_field(tmp_path):
    path = write(tmp_path, {
        "training": {"epochs": 7, "optimizer": {"weight_decay": 0.5}},
        "models": {"unet": {"training": {"iterations_per_epoch": 3,
                                         "optimizer": {"lr": 0.123}}}},
    })
    config = load_config(path, ["models.unet.training.batch_size=4"])
    unet = config.training_for("unet")
    assert (unet.epochs, unet.iterations_per_epoch, unet.batch_size) == (7, 3, 4)
    defaults = model_spec("unet").optimizer_defaults  # AdamW + cosine, the model's own
    assert unet.optimizer.name == defaults.name == "adamw"
    assert unet.optimizer.schedule == "cosine"
    assert unet.optimizer.lr == 0.123 and unet.optimizer.weight_decay == 0.5
    nnunet = config.training_for("nnunet")  # only the shared layer applies to it
    assert (nnunet.epochs, nnunet.iterations_per_epoch) == (7, 250)
    assert (nnunet.optimizer.name, nnunet.optimizer.lr) == ("sgd", 0.01)
    assert nnunet.optimizer.momentum == 0.99 and nnunet.optimizer.weight_decay == 0.5


@pytest.mark.parametrize(("section", "message"), [
    ({"models": {"unet": {"options": {"chanels": [4, 8]}}}}, "chanels"),
    ({"models": {"vnet": {}}}, "unknown model 'vnet'"),
    ({"training": {"optimizer": {"name": "lion"}}}, "training.optimizer.name"),
    ({"models": {"unet": {"training": {"epochs": 0}}}}, "models.unet.training.epochs"),
    ({"registration": {"classical": {"demons_iterations": 0}}},
     "registration.classical.demons_iterations"),
])
def test_a_bad_nested_setting_is_refused_when_the_config_is_read(tmp_path, section, message):
    path = write(tmp_path, section)
    with pytest.raises(MedpipeError, match=message) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
