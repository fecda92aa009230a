"""Fine-tuning that unfreezes a backbone mid-run: split, named groups through a real fit across the unfreeze epoch."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_decay

LR = 0.01
WD = 0.1
BATCHES = 4


class Model(L.LightningModule):
    """A backbone (Linear, BatchNorm, Linear, LayerNorm) and a head: the backbone starts frozen."""

    def __init__(self, mode: str = "decoupled") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 3)
        self.mode = mode
        self.lrs: list[dict[str, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.head(self.backbone(x)), y)

    def on_train_epoch_start(self) -> None:
        optimizer = self.trainer.optimizers[0]
        self.lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})

    def configure_optimizers(self) -> Any:
        return lit_decay.configure_adam(self, lr=LR, weight_decay=WD, mode=self.mode)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8 * BATCHES, 6, generator=generator), torch.randn(8 * BATCHES, 3, generator=generator)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=8)


def fit(tmp_path, model: Model, callback: L.Callback, epochs: int = 4) -> L.Trainer:
    trainer = L.Trainer(
        callbacks=[callback],
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, loader())
    return trainer


@pytest.mark.parametrize("mode", ["decoupled", "decoupled_l1"])
def test_lightnings_own_backbone_finetuning_works_unchanged(tmp_path, mode: str) -> None:
    """Lightning's BackboneFinetuning adds the backbone as one group of plain tensors: the optimizer configure_adam
    returns splits it by the same rules (torch alone would refuse it next to named groups, or decay its norms)."""
    model = Model(mode)
    frozen = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    optimizer = fit(tmp_path, model, BackboneFinetuning(unfreeze_backbone_at_epoch=1), epochs=3).optimizers[0]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["decay", "no_decay", "backbone.decay", "backbone.no_decay"]
    assert groups["backbone.decay"]["param_names"] == ["backbone.0.weight", "backbone.3.weight"]
    assert groups["backbone.no_decay"]["param_names"] == ["backbone.0.bias", "backbone.3.bias", "backbone.4.weight",
                                                          "backbone.4.bias"]  # fmt: skip
    assert (groups["backbone.decay"]["decay_mode"], groups["backbone.decay"]["weight_decay"]) == (mode, WD)
    assert (groups["backbone.no_decay"]["decay_mode"], groups["backbone.no_decay"]["weight_decay"]) == ("none", 0.0)
    # The added group's own lr (10% of the head's at the unfreeze epoch) went to both parts.
    assert model.lrs[1]["backbone.decay"] == model.lrs[1]["backbone.no_decay"] == pytest.approx(LR * 0.1)
    for name, p in model.backbone.named_parameters():
        assert not torch.equal(p.detach(), frozen[name]), name


def test_a_plain_group_added_by_hand_is_split_keeping_its_settings() -> None:
    model = Model()
    model.backbone.requires_grad_(False)
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, verbose=False)
    model.backbone.requires_grad_(True)
    first = list(model.backbone[:3].parameters())
    # Lightning's filter_on_optimizer compares tensors by value: a LayerNorm's initial ones and zeros would pass for
    # the BatchNorm's, already added, and be skipped.
    for p in model.backbone[4].parameters():
        torch.nn.init.normal_(p)
    optimizer.add_param_group({"params": first, "lr": 1e-4, "betas": (0.8, 0.9), "weight_decay": 0.3})
    BackboneFinetuning.unfreeze_and_add_param_group(model.backbone[3:], optimizer, lr=2e-3, initial_denom_lr=1.0)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["decay", "no_decay", "backbone.decay", "backbone.no_decay", "backbone.decay-1",
                            "backbone.no_decay-1"]  # fmt: skip
    assert groups["backbone.decay"]["param_names"] == ["backbone.0.weight"]
    assert groups["backbone.no_decay"]["param_names"] == ["backbone.0.bias", "backbone.1.weight", "backbone.1.bias"]
    for name in ("backbone.decay", "backbone.no_decay"):
        assert (groups[name]["lr"], groups[name]["betas"]) == (1e-4, (0.8, 0.9))
    assert groups["backbone.decay"]["weight_decay"] == 0.3 and groups["backbone.no_decay"]["weight_decay"] == 0.0
    assert groups["backbone.decay-1"]["lr"] == 2e-3 and groups["backbone.decay-1"]["weight_decay"] == WD
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == len(set(map(id, held))) == len(list(model.parameters()))
    with pytest.raises(ValueError, match=r"not trainable parameters of Model"):
        optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    # A split refused in any part adds none of it: one part would flip its weights' sign (lr·wd ≥ 1), one is fine.
    count = len(optimizer.param_groups)
    model.head.requires_grad_(True)
    with pytest.raises(ValueError, match=r"already in this optimizer"):
        optimizer.add_param_group({"params": [model.head.weight]})
    unfrozen = nn.Linear(2, 2)
    model.extra = unfrozen
    with pytest.raises(ValueError, match=r"lr·weight_decay = 2 × 1 = 2 ≥ 1"):
        optimizer.add_param_group({"params": list(unfrozen.parameters()), "lr": 2.0, "weight_decay": 1.0})
    assert len(optimizer.param_groups) == count
    by_hand = lit_decay.Adam(lit_decay.param_groups(Model(), weight_decay=WD))
    with pytest.raises(ValueError, match=r"carry parameter names.*plain tensors.*configure_adam"):
        by_hand.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})


@pytest.mark.parametrize("mode", ["decoupled", "l1"])
def test_backbone_unfreezes_into_split_named_groups(tmp_path, mode: str) -> None:
    model = Model(mode)
    frozen = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    callback = lit_decay.DecayBackboneFinetuning(unfreeze_backbone_at_epoch=2, lambda_func=lambda epoch: 1.5)
    trainer = fit(tmp_path, model, callback)
    optimizer = trainer.optimizers[0]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["decay", "no_decay", "backbone.decay", "backbone.no_decay"]
    # Biases and norm layers of the backbone (BatchNorm and LayerNorm) are not decayed; its weights are.
    assert groups["backbone.decay"]["param_names"] == ["backbone.0.weight", "backbone.3.weight"]
    assert groups["backbone.no_decay"]["param_names"] == [
        "backbone.0.bias",
        "backbone.3.bias",
        "backbone.4.weight",
        "backbone.4.bias",
    ]
    # train_bn=True (the default) trains the BatchNorm from the start: it is in the first no_decay group.
    assert groups["no_decay"]["param_names"] == ["backbone.1.weight", "backbone.1.bias", "head.bias"]
    assert groups["backbone.decay"]["decay_mode"] == mode and groups["backbone.decay"]["weight_decay"] == WD
    assert groups["backbone.no_decay"]["decay_mode"] == "none" and groups["backbone.no_decay"]["weight_decay"] == 0.0
    # BackboneFinetuning's lr schedule, written into every backbone group: 10% of the head's lr at the unfreeze
    # epoch, then x1.5 per epoch.
    assert [set(lrs) for lrs in model.lrs] == [{"decay", "no_decay"}] * 2 + [set(groups)] * 2
    for epoch, expected in ((2, LR * 0.1), (3, LR * 0.1 * 1.5)):
        assert model.lrs[epoch]["backbone.decay"] == pytest.approx(expected)
        assert model.lrs[epoch]["backbone.no_decay"] == pytest.approx(expected)
    # The backbone trained after the unfreeze epoch (every tensor moved) and the state dict carries the names.
    for name, p in model.backbone.named_parameters():
        assert not torch.equal(p.detach(), frozen[name]), name
        assert p in optimizer.state, name
    names = [n for g in optimizer.state_dict()["param_groups"] for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_added_groups_follow_the_decay_rule_step_by_step() -> None:
    """The added groups' decay is applied as their mode says: one decoupled step over the unfrozen weight shrinks it
    by exactly lr·wd before Adam's own step, and its bias by nothing."""
    model = Model()
    model.backbone.requires_grad_(False)
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD)
    model.backbone.requires_grad_(True)
    added = lit_decay.add_param_groups(optimizer, model.backbone, prefix="backbone", lr=1e-3)
    assert [g["name"] for g in added] == ["backbone.decay", "backbone.no_decay"]
    assert lit_decay.add_param_groups(optimizer, model.backbone, prefix="backbone") == []  # nothing left to add
    weight, bias = model.backbone[0].weight, model.backbone[0].bias
    before_w, before_b = weight.detach().clone(), bias.detach().clone()
    optimizer.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own step is then 0: only the decay moves the weights
    optimizer.step()
    torch.testing.assert_close(weight.detach(), before_w * (1 - 1e-3 * WD))
    assert torch.equal(bias.detach(), before_b)


def test_add_param_groups_errors() -> None:
    layer = nn.Linear(2, 2)
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ValueError, match=r"no lit_decay 'decay' group.*weight_decay= and mode="):
        lit_decay.add_param_groups(optimizer, layer)
    with pytest.raises(TypeError, match=r"expected a torch\.optim\.Optimizer; got Linear"):
        lit_decay.add_param_groups(layer, layer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode='l7'"):
        lit_decay.add_param_groups(optimizer, layer, weight_decay=0.1, mode="l7")


def test_train_bn_false_keeps_batch_norm_frozen_and_out_of_the_optimizer(tmp_path) -> None:
    """Lightning's own callback trains the BatchNorm from the first epoch whatever train_bn says; here it stays frozen,
    and out of every group, throughout."""
    model = Model()
    callback = lit_decay.DecayBackboneFinetuning(unfreeze_backbone_at_epoch=1, train_bn=False)
    optimizer = fit(tmp_path, model, callback, epochs=2).optimizers[0]
    held = {n for g in optimizer.param_groups for n in g["param_names"]}
    assert {"backbone.1.weight", "backbone.1.bias"}.isdisjoint(held)
    assert not model.backbone[1].weight.requires_grad and not model.backbone[1].bias.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == held


def test_resume_after_the_unfreeze_epoch_equals_a_straight_run(tmp_path) -> None:
    """BaseFinetuning restores the added groups from the checkpoint, but setup() freezes the backbone again: unless it
    is made trainable, the resumed run trains only the head."""

    def trainer(epochs: int, where: str) -> L.Trainer:
        return L.Trainer(
            callbacks=[lit_decay.DecayBackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.5)],
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path / where,
        )

    straight = Model()
    trainer(4, "straight").fit(straight, loader())
    first = trainer(2, "first")
    first.fit(Model(), loader())
    first.save_checkpoint(tmp_path / "half.ckpt")
    torch.load(tmp_path / "half.ckpt", weights_only=True)  # plain data, the added groups included
    resumed = Model()
    second = trainer(4, "second")
    second.fit(resumed, loader(), ckpt_path=tmp_path / "half.ckpt")
    groups = second.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["decay", "no_decay", "backbone.decay", "backbone.no_decay"]
    assert [g["lr"] for g in groups] == [g["lr"] for g in straight.trainer.optimizers[0].param_groups]
    assert all(p.requires_grad for p in resumed.backbone.parameters())
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
