import torch
from dgpo.cli import main
from tests.test_cli import epoch_metrics
from tests.test_cli import tiny_config, initial_weights
def test_dbg(tmp_path, tiny_model_path, monkeypatch):
    from tests.plugins import ScoringCountModule
    monkeypatch.setattr("dgpo.cli.RLVRModule", ScoringCountModule)
    runs = {}
    for defer in (True, False):
        monkeypatch.setattr(ScoringCountModule, "defer", defer)
        path = tiny_config(tmp_path / str(defer), tiny_model_path, **{"trainer.max_epochs": 2})
        runs[defer] = main(["fit", "--config", str(path)]).model
    print("SCORED", runs[False].scored, runs[True].scored)
    d = max(float((a-b).abs().max()) for a, b in zip(runs[False].policy.state_dict().values(), runs[True].policy.state_dict().values()))
    print("MAXDIFF", d)
    print(epoch_metrics(tmp_path / "True").filter(like="train/").T)
    print(epoch_metrics(tmp_path / "False").filter(like="train/").T)
