"""SAPO, GSPO and GMPO train end to end from their shipped configs, stating their weights."""

import pytest

from dgpo.cli import main
from tests.test_cli import REPO, epoch_metrics, tiny_config


@pytest.mark.parametrize("name,cls", [("sapo", "SAPOLoss"), ("gspo", "GSPOLoss"),
                                      ("gmpo", "GMPOLoss")])
def test_new_loss_configs_train_on_the_tiny_run(tmp_path, tiny_model_path, name, cls):
    config = tiny_config(tmp_path, tiny_model_path, **{"trainer.max_epochs": 1})
    cli = main(["fit", "--config", str(config), "--config",
                str(REPO / "configs" / "losses" / f"{name}.yaml")])
    assert type(cli.model.loss_fn).__name__ == cls
    metrics = epoch_metrics(tmp_path)
    assert metrics["train/grad_norm"].iloc[0] > 0
    assert metrics["train/grad_weight/mean"].notna().all()  # every one states its weight
    if name != "sapo":
        assert metrics["train/seq_ratio/mean"].notna().all()
