"""The imbalance mechanisms act in a real (tiny) run: L-Softmax lambda annealing is run state that
continues across stages, and gradient clipping is per group so ARConvL's radii cannot swallow the
other parameters' steps."""
import json

import pytest
import torch

from conftest import tiny_config
from facepipe.config import ConfigError, config_from_dict
from facepipe.runtime.checkpoint import load_checkpoint
from facepipe.train import Trainer


def lsoftmax(epochs, **head):
    return {"epochs": epochs, "head": {"type": "lsoftmax", "m": 2, **head}}


def anneal_step(trainer):
    """The run's lambda-annealing count (state of the margin-heads plug-in)."""
    return trainer.plugins["margin_heads"].anneal_step


def train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "train"]


def two_lsoftmax_stages(tiny_dataset, tmp_path, **second):
    """Train two L-Softmax epochs, the second stage's head with ``second``; (trainer, steps per
    epoch, lambda of every step)."""
    config = tiny_config(tiny_dataset, tmp_path / "run",
                         train={"stages": [lsoftmax(1), lsoftmax(1, **second)], "log_every_steps": 1})
    trainer = Trainer(config, progress=False)
    trainer.fit()
    return trainer, trainer.steps_per_epoch, [r["lambda"] for r in train_records(tmp_path / "run")]


def test_lambda_continues_across_margin_product_stages(tiny_dataset, tmp_path):
    trainer, steps, lambdas = two_lsoftmax_stages(tiny_dataset, tmp_path, margin_source="uncertainty")
    # One schedule over both stages: the second head went on from the first head's count.
    assert anneal_step(trainer) == 2 * steps
    assert int(trainer.head.it) == 2 * steps
    assert len(lambdas) == 2 * steps
    assert all(later < earlier for earlier, later in zip(lambdas, lambdas[1:])), lambdas  # never restarts
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["anneal_step"] == 2 * steps


def test_lambda_restart_is_explicit(tiny_dataset, tmp_path):
    trainer, steps, lambdas = two_lsoftmax_stages(tiny_dataset, tmp_path, lambda_schedule="restart")
    assert anneal_step(trainer) == steps
    assert lambdas[steps] > lambdas[steps - 1]  # back up at the switch


def test_lambda_schedule_resumes_exactly_after_a_stage_switch(tiny_dataset, tmp_path):
    stages = [{"epochs": 1, "head": {"type": "softmax"}}, lsoftmax(1), lsoftmax(1, margin_source="uncertainty")]
    straight = Trainer(tiny_config(tiny_dataset, tmp_path / "a", train={"stages": stages}), progress=False)
    straight.fit()
    split = tiny_config(tiny_dataset, tmp_path / "b", train={"stages": stages})
    Trainer(split, progress=False).fit(max_epochs=2)
    resumed = Trainer(split, resume=True, progress=False)
    assert anneal_step(resumed) == resumed.steps_per_epoch  # one margin-product epoch so far
    resumed.fit()
    assert anneal_step(resumed) == anneal_step(straight) == 2 * straight.steps_per_epoch
    assert resumed.head.current_lambda == straight.head.current_lambda
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_full_margin_from_the_first_step_when_lambda_base_is_lambda_min(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "run",
                         train={"stages": [{"epochs": 1, "head": {"type": "softmax"}},
                                           lsoftmax(1, lambda_base=5.0, lambda_min=5.0)],
                                "log_every_steps": 1})
    trainer = Trainer(config, progress=False)
    trainer.fit()
    margin_records = [r for r in train_records(tmp_path / "run") if "lambda" in r]
    assert len(margin_records) == trainer.steps_per_epoch
    assert all(r["lambda"] == 5.0 and r["margin_weight"] == pytest.approx(1 / 6) for r in margin_records)


def test_lambda_base_below_lambda_min_is_refused(tiny_dataset, tmp_path):
    with pytest.raises((ConfigError, ValueError), match="lambda_base"):
        tiny_config(tiny_dataset, tmp_path / "run", train={"stages": [lsoftmax(1, lambda_base=1.0, lambda_min=5.0)]})


# ------------------------------------------------------------------ per-group clipping
def arconvl_trainer(tiny_dataset, tmp_path, **optim):
    # No weight decay: its share of a step does not pass through the clip and would hide the scaling.
    config = tiny_config(tiny_dataset, tmp_path, optim={"lr": 0.05, "clip_grad_norm": 1.0, "weight_decay": 0.0,
                                                         **optim},
                         train={"stages": [{"epochs": 1, "head": {"type": "arconvl"}}], "log_every_steps": 1})
    return Trainer(config, progress=False)


def centre_step(trainer, radius_gradient: float) -> torch.Tensor:
    """The centre update of one optimisation step whose radii gradient is inflated to
    ``radius_gradient`` (as when the regions are far from the features)."""
    torch.manual_seed(0)
    images, labels, indices = next(iter(trainer.loader))
    before = trainer.head.centers.detach().clone()
    original = trainer._batch_loss

    def inflated(*args):
        out = original(*args)
        # A term whose gradient reaches the radii only: d/dR of radius_gradient * sum(R).
        out["loss"] = out["loss"] + radius_gradient * trainer.head.radii.sum()
        return out

    trainer._batch_loss = inflated
    trainer._train_step(images, labels, indices)
    return trainer.head.centers.detach() - before


def test_centre_update_does_not_shrink_when_the_radii_gradient_grows(tiny_dataset, tmp_path):
    small = centre_step(arconvl_trainer(tiny_dataset, tmp_path / "a"), radius_gradient=0.0)
    large = centre_step(arconvl_trainer(tiny_dataset, tmp_path / "b"), radius_gradient=1e4)
    assert small.abs().max() > 0
    assert torch.allclose(small, large, atol=1e-7)
    # The former single global norm: the same inflation scales the centre step to almost nothing.
    squashed = centre_step(arconvl_trainer(tiny_dataset, tmp_path / "c", clip_mode="global"), radius_gradient=1e4)
    assert squashed.abs().max() < 1e-2 * small.abs().max()  # (float32 rounding of the centres ~1e-7)


def test_clip_factors_are_logged_per_group(tiny_dataset, tmp_path):
    trainer = arconvl_trainer(tiny_dataset, tmp_path / "run")
    trainer.fit()
    records = train_records(tmp_path / "run")
    assert records
    for record in records:
        assert {"grad_norm_main", "clip_factor_main", "grad_norm_radius", "clip_factor_radius"} <= record.keys()
        assert record["clip_factor_radius"] == 1.0  # the radii are not clipped unless configured
        assert 0 < record["clip_factor_main"] <= 1.0
        expected = min(1.0, 1.0 / (record["grad_norm_main"] + 1e-6))
        assert record["clip_factor_main"] == pytest.approx(expected)


def test_radius_clip_is_opt_in(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "run", optim={"clip_grad_norm": 1.0},
                         train={"stages": [{"epochs": 1, "head": {"type": "arconvl", "radius_clip_grad_norm": 1e-3}}],
                                "log_every_steps": 1})
    trainer = Trainer(config, progress=False)
    trainer.fit()
    assert set(trainer.clipping_groups()) == {"main", "radius"}
    assert trainer.clipping_groups()["radius"][1] == 1e-3
    assert any(r["clip_factor_radius"] < 1.0 for r in train_records(tmp_path / "run"))


def test_global_clip_mode_is_one_group(tiny_dataset, tmp_path):
    config = config_from_dict({**tiny_config(tiny_dataset, tmp_path / "run").to_dict(),
                               "optim": {"clip_grad_norm": 2.0, "clip_mode": "global"}})
    trainer = Trainer(config, progress=False)
    groups = trainer.clipping_groups()
    assert list(groups) == ["global"]
    assert len(groups["global"][0]) == sum(len(g["params"]) for g in trainer.optimizer.param_groups)
