"""make_updater: one interface over SMF, full finetuning, LoRA and GRIT."""
import pytest
from _continual_helpers import fact_batch, random_background, retrofitted

from slotwise.continual.pools import value_pools
from slotwise.continual.updaters import make_updater

PARAMS = {
    "smf": {"top_t": 8, "score": "kl", "lr": 1e-2},
    "full": {"lr": 3e-3},
    "lora": {"r": 4, "lr": 1e-2},
    "grit": {"r": 4, "lr": 1e-2, "reproject_every": 2},
}


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_every_method_steps_and_learns(method):
    model = retrofitted()
    bgs = {p.layers[0]: random_background(p.weight.shape[0]) for p in value_pools(model)}
    up = make_updater(method, model, PARAMS[method], backgrounds=bgs)
    batch = fact_batch()
    losses = [up.step(batch)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0], losses
    assert up.model is not None


def test_unknown_method_and_key_are_clear_errors():
    model = retrofitted()
    with pytest.raises(ValueError, match="one of"):
        make_updater("ewc", model, {})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['topt'\] \(expected one of: top_t"):
        make_updater("smf", model, {"topt": 5})
