import pytest
import torch
from lightning.pytorch import Trainer

from lightning_lip import KEYS, LipRegistry


def test_publish_get_step_of():
    reg = LipRegistry()
    assert reg.get("kappa/bound") is None and reg.step_of("kappa/bound") is None
    reg.publish("kappa/bound", 2.5, step=7)
    assert reg.get("kappa/bound") == 2.5 and reg.step_of("kappa/bound") == 7
    assert reg.entry("kappa/bound") == (2.5, 7)
    assert "kappa/bound" in reg and reg.keys("kappa/") == ["kappa/bound"]


def test_staleness():
    reg = LipRegistry()
    reg.publish("hessian/lambda_max", 4.0, step=10)
    assert reg.get("hessian/lambda_max", max_age=5, step=15) == 4.0
    assert reg.get("hessian/lambda_max", default=-1.0, max_age=5, step=16) == -1.0
    with pytest.raises(ValueError, match="step"):
        reg.get("hessian/lambda_max", max_age=5)


def test_one_registry_per_trainer():
    a, b = Trainer(logger=False), Trainer(logger=False)
    assert LipRegistry.of(a) is LipRegistry.of(a)
    assert LipRegistry.of(a) is not LipRegistry.of(b)


def test_state_dict_round_trip(tmp_path):
    reg = LipRegistry()
    reg.publish("kappa/bound", 3.0, step=1)
    reg.publish("kappa/singular_vectors/net.0", (torch.ones(2), torch.zeros(3)), step=2)
    torch.save(reg.state_dict(), tmp_path / "reg.pt")
    other = LipRegistry()
    other.load_state_dict(torch.load(tmp_path / "reg.pt", weights_only=True))
    assert other.entry("kappa/bound") == (3.0, 1)
    u, v = other.get("kappa/singular_vectors/net.0")
    assert torch.equal(u, torch.ones(2)) and other.step_of("kappa/singular_vectors/net.0") == 2


def test_documented_keys_cover_kappa_publications():
    assert {"kappa/sigma/<layer>", "kappa/kappa/<layer>", "kappa/singular_vectors/<layer>", "kappa/bound"} <= set(KEYS)
