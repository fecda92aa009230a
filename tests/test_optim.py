"""lit_decay.Adam and configure_adam: the five decay modes against an independent float64 reference and against
torch's own Adam, through Lightning's closure, clipping and mixed precision, copies, checkpoints and bad input."""

from __future__ import annotations

import copy
import gc
import math
import pickle
import warnings
from fractions import Fraction

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import lit_decay
from lit_decay.configure import report_of
from lit_decay.grouping import GroupingReport
from lit_decay.modes import rule_of
from tests.reference import ReferenceAdam, ReferenceState, assert_unchanged, clip_grad_norm, snapshot

MODES = ("l2", "decoupled", "l1", "decoupled_l1", "none")
LR = 1e-2
WD = 0.1
HEAD = {"pattern": "*head.*", "name": "head", "lr_scale": 0.5, "weight_decay": 0.05}
MID = {"pattern": "*body.2.weight", "name": "mid", "lr_scale": 2.0, "weight_decay": 0.2}


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Two hidden layers of width 16, a LayerNorm (no decay) and a head: four groups with the overrides above."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def overrides_for(mode: str) -> list[dict]:
    """Overrides that give the head and the middle weight modes other than ``mode``: one optimizer mixes three."""
    i = MODES.index(mode)
    return [{**HEAD, "mode": MODES[(i + 1) % 5]}, {**MID, "mode": MODES[(i + 2) % 5]}]


def expected_settings(prefix: str, mode: str, lr: float = LR, wd: float = WD) -> dict[str, tuple[float, float, str]]:
    """{name: (lr, weight_decay, mode)} written out by hand from the grouping rules, for the reference."""
    head, mid = overrides_for(mode)
    p = prefix
    return {
        f"{p}body.0.weight": (lr, wd, mode),
        f"{p}body.0.bias": (lr, 0.0, "none"),
        f"{p}body.2.weight": (lr * mid["lr_scale"], mid["weight_decay"], mid["mode"]),
        f"{p}body.2.bias": (lr, 0.0, "none"),
        f"{p}body.3.weight": (lr, 0.0, "none"),
        f"{p}body.3.bias": (lr, 0.0, "none"),
        f"{p}head.weight": (lr * head["lr_scale"], head["weight_decay"], head["mode"]),
        f"{p}head.bias": (lr * head["lr_scale"], head["weight_decay"], head["mode"]),
    }


def batches(n: int, dtype: torch.dtype, seed: int = 1, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=generator, dtype=dtype), torch.randn(size, 3, generator=generator, dtype=dtype))
        for _ in range(n)
    ]


def reference_grads(
    template: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The loss gradient at the reference's own float64 weights (so its trajectory is independent of the model's)."""
    leaves = {name: p.detach().clone().requires_grad_(True) for name, p in params.items()}
    loss = F.mse_loss(functional_call(template, leaves, (x.double(),)), y.double())
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


def state_of(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {name: optimizer.state[p] for name, p in model.named_parameters() if p in optimizer.state}


def assert_matches_reference(
    model: nn.Module, optimizer: torch.optim.Optimizer, ref: ReferenceAdam, *, atol: float, rtol: float
) -> None:
    states = state_of(optimizer, model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), ref.params[name], atol=atol, rtol=rtol, msg=name)
        state, expected = states[name], ref.state[name]
        assert int(state["step"]) == expected.step, name
        torch.testing.assert_close(state["exp_avg"].double(), expected.exp_avg, atol=atol, rtol=rtol, msg=name)
        torch.testing.assert_close(state["exp_avg_sq"].double(), expected.exp_avg_sq, atol=atol, rtol=rtol, msg=name)
        if ref.amsgrad:
            torch.testing.assert_close(
                state["max_exp_avg_sq"].double(), expected.max_exp_avg_sq, atol=atol, rtol=rtol, msg=name
            )


# --------------------------------------------------------------------------------------------------------------------
# The five modes against the float64 reference
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "for-loop"])
@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_reference_float64(mode: str, fused: bool, amsgrad: bool) -> None:
    """A float64 model follows the reference's own independent trajectory to rounding error over 60 steps."""
    model = Net().double()
    optimizer = lit_decay.configure_adam(
        model, lr=LR, weight_decay=WD, mode=mode, overrides=overrides_for(mode), fused=fused, amsgrad=amsgrad
    )
    assert optimizer.defaults["fused"] is fused
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay", "head", "mid"]
    settings = expected_settings("", mode)
    ref = ReferenceAdam.from_named(model.named_parameters(), settings, amsgrad=amsgrad)
    template = copy.deepcopy(model)
    for x, y in batches(60, torch.float64):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        ref.step(reference_grads(template, ref.params, x, y))
    assert_matches_reference(model, optimizer, ref, atol=1e-10, rtol=1e-9)
    # The run did something in every group: no parameter is left at its initial value.
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), template.get_parameter(name).detach()), name


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "for-loop"])
@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_reference_float32(mode: str, fused: bool, amsgrad: bool) -> None:
    """A float32 model stays within float32 rounding of the float64 reference fed the same gradients."""
    model = Net()
    optimizer = lit_decay.configure_adam(
        model, lr=LR, weight_decay=WD, mode=mode, overrides=overrides_for(mode), fused=fused, amsgrad=amsgrad
    )
    ref = ReferenceAdam.from_named(model.named_parameters(), expected_settings("", mode), amsgrad=amsgrad)
    for x, y in batches(50, torch.float32):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        # The hooks change p.grad in place (l1): the reference gets the loss gradient as backward left it.
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        ref.step(grads)
    assert_matches_reference(model, optimizer, ref, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# l2 and decoupled are torch's own Adam / AdamW, bit for bit
# --------------------------------------------------------------------------------------------------------------------


def torch_groups(model: nn.Module, head: dict, mid: dict, *, lr: float, wd: float, decoupled: dict) -> list[dict]:
    """The same four groups built by hand for torch's optimizer (``decoupled`` maps group name → AdamW-style)."""
    named = dict(model.named_parameters())
    return [
        {"params": [named["body.0.weight"]], "weight_decay": wd, "decoupled_weight_decay": decoupled["decay"]},
        {"params": [named[n] for n in ("body.0.bias", "body.2.bias", "body.3.weight", "body.3.bias")],
         "weight_decay": 0.0},
        {"params": [named["head.weight"], named["head.bias"]], "lr": lr * head["lr_scale"],
         "weight_decay": head["weight_decay"], "decoupled_weight_decay": decoupled["head"]},
        {"params": [named["body.2.weight"]], "lr": lr * mid["lr_scale"], "weight_decay": mid["weight_decay"],
         "decoupled_weight_decay": decoupled["mid"]},
    ]  # fmt: skip


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "for-loop"])
@pytest.mark.parametrize("case", ["l2", "decoupled", "mixed"])
def test_l2_and_decoupled_are_torch_adam_bit_for_bit(case: str, fused: bool, amsgrad: bool) -> None:
    modes = {"l2": ("l2", "l2", "l2"), "decoupled": ("decoupled",) * 3, "mixed": ("l2", "decoupled", "l2")}[case]
    head, mid = {**HEAD, "mode": modes[1]}, {**MID, "mode": modes[2]}
    ours = Net()
    theirs, initial = copy.deepcopy(ours), copy.deepcopy(ours)
    optimizer = lit_decay.configure_adam(
        ours, lr=LR, weight_decay=WD, mode=modes[0], overrides=[head, mid], fused=fused, amsgrad=amsgrad
    )
    decoupled = {"decay": modes[0] == "decoupled", "head": modes[1] == "decoupled", "mid": modes[2] == "decoupled"}
    groups = torch_groups(theirs, head, mid, lr=LR, wd=WD, decoupled=decoupled)
    cls = torch.optim.AdamW if case == "decoupled" else torch.optim.Adam
    if case == "decoupled":
        for group in groups:
            group.pop("decoupled_weight_decay", None)
    expected = cls(groups, lr=LR, amsgrad=amsgrad, fused=fused, foreach=False if not fused else None)
    for x, y in batches(30, torch.float32):
        for model, opt in ((ours, optimizer), (theirs, expected)):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name
        for key, value in optimizer.state[a].items():
            assert torch.equal(value, expected.state[b][key]), (name, key)
    for a, b in zip(ours.parameters(), initial.parameters()):
        assert not torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------------
# Through Lightning: closure-based step, gradient clipping before the L1 term
# --------------------------------------------------------------------------------------------------------------------


class LitNet(L.LightningModule):
    """A deterministic float64 model that records every batch it trains on, so a reference can replay them."""

    def __init__(self, mode: str, scheduler=None) -> None:
        super().__init__()
        self.net = Net().double()
        self.mode = mode
        self.scheduler = scheduler
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x.clone(), y.clone()))
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return lit_decay.configure_adam(
            self, lr=LR, weight_decay=WD, mode=self.mode, overrides=overrides_for(self.mode), scheduler=self.scheduler
        )


def loader(n_batches: int, seed: int = 3) -> DataLoader:
    x, y = (torch.cat(t) for t in zip(*batches(n_batches, torch.float64, seed=seed)))
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**{**options, **kwargs})


@pytest.mark.parametrize("mode", ["l1", "decoupled_l1", "decoupled"])
def test_lightning_fit_with_clipping_matches_reference(tmp_path, mode: str) -> None:
    clip = 0.05
    module = LitNet(mode)
    template = copy.deepcopy(module.net)
    settings = expected_settings("", mode)
    ref = ReferenceAdam.from_named(template.named_parameters(), settings)
    trainer(tmp_path, max_steps=12, gradient_clip_val=clip).fit(module, loader(6))
    assert len(module.seen) == 12
    optimizer = module.trainer.optimizers[0]
    assert optimizer.defaults["fused"] is True and isinstance(optimizer, lit_decay.Adam)
    norms = []
    for x, y in module.seen:
        clipped, norm = clip_grad_norm(reference_grads(template, ref.params, x, y), clip)
        norms.append(norm)
        ref.step(clipped)
    # Clipping really happened (every step here): the L1 term must come after it, or the match below fails.
    assert min(norms) > clip
    assert_matches_reference(module.net, optimizer, ref, atol=1e-10, rtol=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# GradScaler with the fused kernel: scaled gradients in the pre-hook, found_inf steps change nothing
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", ["l1", "decoupled_l1", "decoupled"])
def test_grad_scaler_fused_step_matches_unscaled_and_skips_inf(mode: str, dtype: torch.dtype) -> None:
    scaled, plain = Net().to(dtype), Net().to(dtype)
    plain.load_state_dict(scaled.state_dict())
    kwargs = {"lr": LR, "weight_decay": WD, "mode": mode, "overrides": overrides_for(mode), "fused": True}
    opt_scaled = lit_decay.configure_adam(scaled, **kwargs)
    opt_plain = lit_decay.configure_adam(plain, **kwargs)
    ref = ReferenceAdam.from_named(plain.named_parameters(), expected_settings("", mode))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    data = batches(4, dtype)

    for x, y in data[:3]:
        opt_scaled.zero_grad()
        scaler.scale(F.mse_loss(scaled(x), y)).backward()
        scaler.step(opt_scaled)
        scaler.update()
        opt_plain.zero_grad()
        F.mse_loss(plain(x), y).backward()
        ref.step({name: p.grad.clone() for name, p in plain.named_parameters()})
        opt_plain.step()
    assert scaler.get_scale() == 1024.0  # no step was skipped
    # Scaling by a power of two is exact, so the scaled fused step is the unscaled one bit for bit (in float64 too:
    # the L1 term and threshold must not pass through the scaler's float32 tensors at float32 precision).
    for (name, a), b in zip(scaled.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name
    tight = dtype == torch.float64
    assert_matches_reference(scaled, opt_scaled, ref, atol=1e-12 if tight else 2e-6, rtol=1e-10 if tight else 1e-5)

    before = snapshot(scaled, opt_scaled)
    x, y = data[3]
    opt_scaled.zero_grad()
    scaler.scale(F.mse_loss(scaled(x), y)).backward()
    scaled.body[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt_scaled)
    scaler.update()
    assert scaler.get_scale() == 512.0  # the scaler saw the inf and skipped the step
    assert_unchanged(before, snapshot(scaled, opt_scaled))


# --------------------------------------------------------------------------------------------------------------------
# Lightning's mixed precision with gradient clipping: the fused kernel stays, Lightning unscales before clipping
# --------------------------------------------------------------------------------------------------------------------


class AmpNet(L.LightningModule):
    """A float32 model (autocast casts float32 only) that records the gradients Lightning hands the optimizer: after
    unscaling, before clipping. ``poison`` lists batches whose gradient gets an inf, which the GradScaler must skip."""

    def __init__(self, mode: str, poison: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.net = Net()
        self.mode = mode
        self.poison = poison
        self.grads: list[dict[str, torch.Tensor]] = []
        self.backwards = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x).float(), y.float())

    def on_after_backward(self) -> None:
        if self.backwards in self.poison:
            self.net.body[0].weight.grad[0, 0] = float("inf")
        self.backwards += 1

    def on_before_optimizer_step(self, optimizer) -> None:
        self.grads.append({name: p.grad.detach().clone() for name, p in self.net.named_parameters()})

    def configure_optimizers(self):
        overrides = overrides_for(self.mode)
        return lit_decay.configure_adam(self, lr=LR, weight_decay=WD, mode=self.mode, overrides=overrides)


def all_finite(grads: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads.values())


def float_loader(n_batches: int) -> DataLoader:
    x, y = (torch.cat(t) for t in zip(*batches(n_batches, torch.float32, seed=5)))
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def precision_options(precision: str) -> dict:
    """Trainer options for ``precision`` on CPU: Lightning turns ``precision="16-mixed"`` on CPU into bf16, so the
    float16 path (with its GradScaler, on CPU since torch 2.4) is asked for through the plugin itself."""
    if precision == "16-mixed":
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": precision}


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("mode", ["l1", "decoupled_l1", "decoupled"])
def test_mixed_precision_with_clipping_matches_reference(tmp_path, mode: str, precision: str) -> None:
    """Lightning refuses to clip an optimizer that unscales its own gradients (torch's fused Adam): configure_adam
    keeps the fused kernel and leaves unscaling to Lightning, and the run follows the float64 reference fed the same
    unscaled gradients, clipped by the reference itself, with the scaler's skipped steps changing nothing."""
    clip = 0.05
    scaled = precision == "16-mixed"
    module = AmpNet(mode, poison=(2, 5) if scaled else ())
    ref = ReferenceAdam.from_named(module.net.named_parameters(), expected_settings("", mode))
    trainer(tmp_path, max_steps=9, gradient_clip_val=clip, **precision_options(precision)).fit(module, float_loader(9))
    optimizer = module.trainer.optimizers[0]
    assert optimizer.defaults["fused"] is True and optimizer._step_supports_amp_scaling is False
    implementation = report_of(optimizer).implementation
    assert implementation.startswith("fused (") and precision in implementation
    assert ("gradient_clip_val=0.05" in implementation) is scaled
    norms, skipped = [], 0
    for grads in module.grads:
        if not all_finite(grads):
            skipped += 1  # GradScaler.step skipped it: no update, no L1 term, no step count
            continue
        clipped, norm = clip_grad_norm(grads, clip)
        norms.append(norm)
        ref.step(clipped)
    assert skipped == (2 if scaled else 0) and len(module.grads) == 9
    assert min(norms) > clip  # clipping happened: on unscaled gradients, or the match below fails by the scale
    assert_matches_reference(module.net, optimizer, ref, atol=2e-5, rtol=1e-4)


def test_amp_decision_follows_the_trainer(tmp_path) -> None:
    """The flag is turned off only where Lightning needs it: not outside a Trainer, not under 32-bit or under
    16-mixed without clipping (the fused kernel then unscales inside itself, with no host sync)."""
    assert lit_decay.configure_adam(Net())._step_supports_amp_scaling is True
    cases = [
        ({"precision": "32-true", "gradient_clip_val": 1.0}, True),
        (precision_options("16-mixed"), True),
        ({**precision_options("16-mixed"), "gradient_clip_val": 1.0}, False),
        (precision_options("bf16-mixed"), False),
    ]
    for options, flag in cases:
        module = AmpNet("decoupled")
        module.trainer = trainer(tmp_path, **options)
        optimizer = module.configure_optimizers()
        assert optimizer._step_supports_amp_scaling is flag, options
        assert optimizer.defaults["fused"] is True

    class OwnClipping(AmpNet):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.clip_gradients(optimizer, 1.0)

    module = OwnClipping("decoupled")
    module.trainer = trainer(tmp_path, **precision_options("16-mixed"))
    optimizer = module.configure_optimizers()
    assert optimizer._step_supports_amp_scaling is False
    assert "OwnClipping.configure_gradient_clipping" in report_of(optimizer).implementation


# --------------------------------------------------------------------------------------------------------------------
# decoupled_l1 leaves exact zeros
# --------------------------------------------------------------------------------------------------------------------


def test_decoupled_l1_zeros_match_reference_and_sparsity_rises() -> None:
    model = Net().double()
    strong = {"pattern": "body.2.weight", "name": "strong", "weight_decay": 1.0, "mode": "decoupled_l1"}
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode="decoupled_l1", overrides=[strong])
    settings = {name: (LR, 0.0, "none") for name, _ in model.named_parameters()}
    settings["body.0.weight"] = (LR, WD, "decoupled_l1")
    settings["head.weight"] = (LR, WD, "decoupled_l1")
    settings["body.2.weight"] = (LR, 1.0, "decoupled_l1")
    ref = ReferenceAdam.from_named(model.named_parameters(), settings)
    template = copy.deepcopy(model)
    sparsity = []
    for x, y in batches(40, torch.float64):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        sparsity.append(lit_decay.group_stats(optimizer, metrics=["sparsity"])["sparsity/strong"])
        ref.step(reference_grads(template, ref.params, x, y))
        for name, p in model.named_parameters():
            assert torch.equal(p == 0, ref.params[name] == 0), name
    weight = model.body[2].weight
    assert sparsity[-1] == pytest.approx((weight == 0).double().mean().item())
    assert sparsity[0] < 0.2 < 0.5 < sparsity[-1]
    assert sparsity[-1] >= max(sparsity[:10])
    assert (model.body[0].weight == 0).any()  # the mildly penalised layer has a few exact zeros too
    assert_matches_reference(model, optimizer, ref, atol=1e-10, rtol=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# "weight_decay" is each group's strength in every mode: whatever writes it (a DINO-style loop, a scheduler), 0 included
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_weight_decay_written_by_a_loop_is_the_strength_applied_and_reported(mode: str) -> None:
    """A loop sets group["weight_decay"] every step, down to 0 and back: that is the strength of the group's mode from
    the next step on (an L1 group at 0 shrinks nothing), torch never adds an L2 term to an L1 group, nothing warns."""
    model = Net().double()
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode=mode, verbose=False)
    settings = {name: (LR, 0.0, "none") for name, _ in model.named_parameters()}
    settings["body.0.weight"] = settings["body.2.weight"] = settings["head.weight"] = (LR, WD, mode)
    ref = ReferenceAdam.from_named(model.named_parameters(), settings)
    template = copy.deepcopy(model)
    schedule = [0.04, 0.3, 0.0, 0.0, 0.2, 0.0, 0.5, 0.1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for (x, y), wd in zip(batches(8, torch.float64), schedule):
            optimizer.param_groups[0]["weight_decay"] = wd  # the "decay" group
            ref.group_of("body.0.weight").weight_decay = wd
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
            ref.step(reference_grads(template, ref.params, x, y))
            assert optimizer.param_groups[0]["weight_decay"] == wd
            figures = lit_decay.group_stats(optimizer, metrics=["effective_decay", "weight_decay"])
            assert figures["weight_decay/decay"] == wd
            if mode == "decoupled":
                assert figures["effective_decay/decay"] == pytest.approx(LR * wd)
            if wd == 0.0 and mode != "decoupled_l1":  # decoupled_l1's figure is unknowable after the step
                assert figures["effective_decay/decay"] == 0.0
    assert_matches_reference(model, optimizer, ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("mode", ["l1", "decoupled_l1"])
def test_an_l1_group_written_to_zero_stops_decaying(mode: str) -> None:
    """The fault of the hooks' two keys: writing 0 into an L1 group's weight_decay must stop the shrinking."""
    model, control = Net().double(), Net().double()
    control.load_state_dict(model.state_dict())
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode=mode, verbose=False)
    plain = lit_decay.configure_adam(control, lr=LR, weight_decay=WD, mode="none", verbose=False)
    optimizer.param_groups[0]["weight_decay"] = 0.0
    for x, y in batches(5, torch.float64):
        for net, opt in ((model, optimizer), (control, plain)):
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), control.parameters()):
        assert torch.equal(a, b), name


def test_a_none_group_decays_nothing_whatever_its_strength() -> None:
    model = Net()
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode="none", verbose=False)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]  # so torch's own Adam agrees
    before = copy.deepcopy(model)
    reference = torch.optim.Adam(before.parameters(), lr=LR, fused=True)
    optimizer.param_groups[0]["weight_decay"] = 0.5
    for x, y in batches(3, torch.float32):
        for net, opt in ((model, optimizer), (before, reference)):
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), before.parameters()):
        assert torch.equal(a, b)


def test_rule_of_a_hand_built_torch_optimizer_reads_torch_keys() -> None:
    """Over param_groups() in torch's own Adam, what torch applies is reported: decoupled groups as AdamW, an L1
    group's strength as L2 (the audit says so), a written weight_decay as the new strength."""
    groups = lit_decay.param_groups(Net(), weight_decay=WD, mode="decoupled")
    optimizer = torch.optim.Adam(groups, lr=LR)
    optimizer.param_groups[0]["weight_decay"] = 0.04
    optimizer.param_groups[1]["weight_decay"] = 0.02
    decoupled, other = (rule_of(optimizer, g) for g in optimizer.param_groups)
    assert (decoupled.mode.name, decoupled.strength, decoupled.lit_decay) == ("decoupled", 0.04, False)
    assert (other.mode.name, other.strength) == ("l2", 0.02)
    l1 = torch.optim.Adam(lit_decay.param_groups(Net(), weight_decay=WD, mode="l1"), lr=LR)
    assert rule_of(l1, l1.param_groups[0]).mode.name == "l2"


# --------------------------------------------------------------------------------------------------------------------
# lit_decay.Adam built by hand, its state_dict, and nothing global
# --------------------------------------------------------------------------------------------------------------------


def test_adam_by_hand_from_param_groups_and_from_parameters() -> None:
    model = Net()
    groups = lit_decay.param_groups(model, weight_decay=WD, mode="l1")
    del groups[1]["decay_mode"]  # a group without a mode takes the optimizer's
    optimizer = lit_decay.Adam(groups, lr=LR, mode="decoupled_l1")
    assert [g["decay_mode"] for g in optimizer.param_groups] == ["l1", "decoupled_l1"]
    assert optimizer.param_groups[1]["decoupled_weight_decay"] is False
    assert optimizer.defaults["fused"] is True and optimizer.defaults["decay_mode"] == "decoupled_l1"
    # Adam(model.parameters()) is AdamW: same defaults (lr 1e-3, weight_decay 1e-2, decoupled).
    plain, reference = Net(), Net()
    reference.load_state_dict(plain.state_dict())
    ours, theirs = lit_decay.Adam(plain.parameters()), torch.optim.AdamW(reference.parameters(), fused=True)
    for x, y in batches(3, torch.float32):
        for net, opt in ((plain, ours), (reference, theirs)):
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            opt.step()
    for a, b in zip(plain.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_state_dict_is_torch_adams_both_ways() -> None:
    model = Net()
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode="l1", verbose=False)
    for x, y in batches(2, torch.float32):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    saved = optimizer.state_dict()
    assert set(saved) == {"state", "param_groups"}
    torch_adam = torch.optim.Adam(lit_decay.param_groups(model, weight_decay=WD, mode="l1"), lr=LR, fused=True)
    torch_adam.load_state_dict(saved)
    again = lit_decay.Adam(lit_decay.param_groups(model, weight_decay=WD, mode="l1"), lr=LR)
    again.load_state_dict(torch_adam.state_dict())
    assert again.state_dict()["param_groups"] == saved["param_groups"]
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(again.state_dict()["state"][index][key], value)


def test_nothing_global(tmp_path) -> None:
    """No process-wide optimizer hook, no change to torch's or dynamo's configuration, after every public entry."""
    from torch.optim import optimizer as torch_optimizer

    limit = torch._dynamo.config.recompile_limit
    model = Net()
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode="l1", verbose=False)
    statistics = lit_decay.StepStatistics([optimizer])
    for x, y in batches(2, torch.float32):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        statistics.before_step(optimizer)
        optimizer.step()
        statistics.after_step(optimizer)
        assert statistics.collect()
    assert not torch_optimizer._global_optimizer_pre_hooks and not torch_optimizer._global_optimizer_post_hooks
    assert torch._dynamo.config.recompile_limit == limit
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


@pytest.mark.parametrize("as_keyword", [False, True])
@pytest.mark.parametrize("mode", ["l1", "decoupled_l1", "decoupled"])
def test_closure_runs_once_and_its_loss_is_returned(mode: str, as_keyword: bool) -> None:
    model = Net()
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode=mode, verbose=False)
    x, y = batches(1, torch.float32)[0]
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = optimizer.step(closure=closure) if as_keyword else optimizer.step(closure)
    assert len(calls) == 1 and isinstance(loss, torch.Tensor) and loss.requires_grad


@pytest.mark.parametrize("mode", ["l1", "decoupled_l1"])
def test_parameter_without_gradient_is_untouched(mode: str) -> None:
    model = Net()
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=10.0, mode=mode, verbose=False)
    _, y = batches(1, torch.float32)[0]
    F.mse_loss(model.head(torch.randn(8, 16)), y).backward()  # the body gets no gradient
    before = model.body[0].weight.detach().clone()
    optimizer.step()
    assert torch.equal(model.body[0].weight, before) and model.body[0].weight not in optimizer.state


# --------------------------------------------------------------------------------------------------------------------
# Copies of the optimizer keep the L1 penalty (torch copies no step hooks)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("mode", ["l1", "decoupled_l1"])
def test_copied_optimizer_keeps_the_l1_penalty(mode: str, how: str) -> None:
    model = Net().double()
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode=mode, overrides=overrides_for(mode))
    data = batches(6, torch.float64)
    for x, y in data[:2]:
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    # Model and optimizer copied together, as a training state is (the copy's groups hold the copied tensors).
    if how == "deepcopy":
        copied_model, copied = copy.deepcopy((model, optimizer))
    else:
        copied_model, copied = pickle.loads(pickle.dumps((model, optimizer)))
    assert copied.param_groups[0]["params"][0] is copied_model.body[0].weight
    ref = ReferenceAdam.from_named(model.named_parameters(), expected_settings("", mode))
    for name, p in model.named_parameters():  # the reference continues from the copied state
        ref.state[name] = ReferenceState(
            int(optimizer.state[p]["step"]),
            optimizer.state[p]["exp_avg"].double().clone(),
            optimizer.state[p]["exp_avg_sq"].double().clone(),
            torch.zeros_like(p, dtype=torch.float64),
        )
    template = copy.deepcopy(model)
    for x, y in data[2:]:
        copied.zero_grad()
        F.mse_loss(copied_model(x), y).backward()
        copied.step()
        ref.step(reference_grads(template, ref.params, x, y))
    assert type(copied) is lit_decay.Adam
    assert_matches_reference(copied_model, copied, ref, atol=1e-10, rtol=1e-9)
    # The penalty is the class's: no hook on either, so the copy's terms are applied once.
    assert not optimizer._optimizer_step_pre_hooks and not copied._optimizer_step_pre_hooks


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint and resume
# --------------------------------------------------------------------------------------------------------------------


def step_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    return torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("mode", ["decoupled", "l1", "decoupled_l1"])
def test_resume_from_checkpoint_equals_straight_run(tmp_path, mode: str) -> None:
    schedule = {"scheduler": step_lr, "interval": "step"}
    straight = LitNet(mode, scheduler=schedule)
    resumed = LitNet(mode, scheduler=schedule)  # other initial weights: the checkpoint must restore everything
    assert not torch.equal(resumed.net.head.weight, straight.net.head.weight)
    data = loader(5)

    def checkpoints(where):
        # Saved after the optimizer step of step 5. (Lightning 2.6 replays a batch when resuming from a checkpoint
        # taken by trainer.save_checkpoint after fit stopped at max_steps on an epoch's last batch, with any optimizer,
        # so that form cannot give a straight run's batch sequence.)
        return [ModelCheckpoint(dirpath=where, every_n_train_steps=5, save_top_k=-1)]

    straight_run = trainer(
        tmp_path / "straight", max_steps=10, enable_checkpointing=True, callbacks=checkpoints(tmp_path / "ckpt")
    )
    straight_run.fit(straight, data)
    path = tmp_path / "ckpt" / "epoch=0-step=5.ckpt"
    second = trainer(
        tmp_path / "second", max_steps=10, enable_checkpointing=True, callbacks=checkpoints(tmp_path / "ckpt")
    )
    second.fit(resumed, data, ckpt_path=path)

    assert second.global_step == 10
    assert len(resumed.seen) == 5
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed.seen, straight.seen[5:]))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    expected, got = straight.trainer.optimizers[0].state_dict(), second.optimizers[0].state_dict()
    assert expected["param_groups"] == got["param_groups"]
    assert got["param_groups"][0]["lr"] == pytest.approx(LR * 0.5**3)
    assert expected["state"].keys() == got["state"].keys()
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(value, got["state"][index][key]), (index, key)
    assert isinstance(second.optimizers[0], lit_decay.Adam)

    checkpoint = torch.load(path, weights_only=True)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [g["name"] for g in groups] == ["decay", "no_decay", "head", "mid"]
    assert [g["decay_mode"] for g in groups] == [mode, "none", *(o["mode"] for o in overrides_for(mode))]
    strengths = [o["weight_decay"] if o["mode"] != "none" else 0.0 for o in overrides_for(mode)]
    assert [g["weight_decay"] for g in groups] == [WD, 0.0, *strengths]
    assert groups[2]["param_names"] == ["net.head.weight", "net.head.bias"]
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 5


# --------------------------------------------------------------------------------------------------------------------
# configure_adam's API
# --------------------------------------------------------------------------------------------------------------------


def test_configure_adam_returns_plain_fused_adam_with_report() -> None:
    model = Net()
    optimizer = lit_decay.configure_adam(model, lr=0.02, weight_decay=WD, overrides=overrides_for("decoupled"))
    assert type(optimizer) is lit_decay.Adam and isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["fused"] is True
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.02, 0.02 * 0.5, 0.02 * 2.0]
    report = report_of(optimizer)
    assert isinstance(report, GroupingReport) and report.implementation == "fused"
    assert [g.name for g in report.groups] == ["decay", "no_decay", "head", "mid"]
    assert "Adam implementation: fused" in report.summary()
    groups = optimizer.state_dict()["param_groups"]
    assert [g["param_names"] for g in groups] == [
        ["body.0.weight"],
        ["body.0.bias", "body.2.bias", "body.3.weight", "body.3.bias"],
        ["head.weight", "head.bias"],
        ["body.2.weight"],
    ]
    assert report_of(torch.optim.Adam(model.parameters())) is None


def test_configure_adam_report_shows_the_lr_each_group_got() -> None:
    optimizer = lit_decay.configure_adam(Net(), lr=0.02, weight_decay=WD, overrides=overrides_for("decoupled"))
    report = report_of(optimizer)
    assert report is not None and report.lr == 0.02
    table = report.lr_table()
    assert table is not None
    shown = {name: float(lr) for name, lr, _ in table.rows}
    assert shown == {g["name"]: pytest.approx(g["lr"]) for g in optimizer.param_groups}
    assert "Learning rates at base lr=0.02:" in report.summary().splitlines()


def test_mode_error_names_the_mode_whatever_the_entry_point() -> None:
    for entry in (lit_decay.configure_adam, lit_decay.param_groups, lit_decay.explain):
        with pytest.raises(ValueError, match=r"^mode='adamw' is not a decay mode; valid modes are 'l2', "):
            entry(Net(), weight_decay=WD, mode="adamw")


def test_layer_decay_reaches_the_optimizer_and_groups_added_later() -> None:
    """configure_adam(layer_decay=) gives param_groups(layer_decay=)'s groups and lrs; a backbone unfrozen later is
    split by the same layers (numbered over the whole model)."""
    from tests.test_grouping import Layered

    model = Layered()
    model.blocks[2].requires_grad_(False)
    optimizer = lit_decay.configure_adam(model, lr=1.0, weight_decay=0.1, layer_decay=0.5, verbose=False)
    expected = lit_decay.param_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [(g["name"], g["lr"]) for g in expected]
    model.blocks[2].requires_grad_(True)
    optimizer.add_param_group({"params": list(model.blocks[2].parameters()), "lr": 1.0})
    added = {g["name"]: g for g in optimizer.param_groups[len(expected) :]}
    assert {name: g["lr"] for name, g in added.items()} == {
        "blocks.2.layer_3.decay": 0.5,
        "blocks.2.layer_3.no_decay": 0.5,
    }
    assert added["blocks.2.layer_3.no_decay"]["weight_decay"] == 0.0


def test_fused_false_is_the_for_loop_on_cpu() -> None:
    optimizer = lit_decay.configure_adam(Net(), fused=False)
    assert optimizer.defaults["fused"] is False and optimizer.defaults["foreach"] is False
    assert report_of(optimizer).implementation == "for-loop"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_float_dtypes_stay_fused(dtype: torch.dtype) -> None:
    optimizer = lit_decay.configure_adam(Net().to(dtype), weight_decay=WD, mode="l1")
    assert optimizer.defaults["fused"] is True
    assert lit_decay.configure_adam(Net().to(dtype), fused=True).defaults["fused"] is True


class WithComplex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.phase = nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))


def test_complex_parameter_falls_back_or_refuses_fused() -> None:
    optimizer = lit_decay.configure_adam(WithComplex())
    assert optimizer.defaults["fused"] is False
    assert report_of(optimizer).implementation == "for-loop"
    with pytest.raises(ValueError, match=r"fused=True.*'phase'.*device=cpu.*dtype=torch\.complex64"):
        lit_decay.configure_adam(WithComplex(), fused=True)


@pytest.mark.parametrize("mode", ["l1", "decoupled_l1"])
def test_complex_parameter_in_an_l1_group_is_refused_up_front(mode: str) -> None:
    with pytest.raises(ValueError, match=rf"parameter 'phase' is in an '{mode}' group but is complex.*complex64"):
        lit_decay.configure_adam(WithComplex(), weight_decay=WD, mode=mode)
    # The way out the message gives works: the complex tensor in another mode, the rest in the L1 mode.
    optimizer = lit_decay.configure_adam(
        WithComplex(), weight_decay=WD, mode=mode, overrides=[{"pattern": "phase", "mode": "decoupled"}]
    )
    assert [g["decay_mode"] for g in optimizer.param_groups] == [mode, "none", "decoupled"]


class WithSparseEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(10, 4, sparse=True)
        self.bag = nn.EmbeddingBag(10, 4, sparse=True)
        self.out = nn.Linear(4, 2)


@pytest.mark.parametrize("mode", ["l1", "decoupled_l1", "decoupled"])
def test_sparse_embedding_is_refused_up_front(mode: str) -> None:
    """In an L1 group torch would fail inside the L1 term at the first step ("add(sparse, dense) is not supported"),
    elsewhere in Adam's step; configure_adam names the parameter before any step, whatever its group."""
    with pytest.raises(ValueError, match=r"'tokens\.weight' gets sparse gradients \(Embedding\(sparse=True\)\)"):
        lit_decay.configure_adam(WithSparseEmbedding(), weight_decay=WD, mode=mode)
    model = WithSparseEmbedding()
    model.tokens.sparse = False
    with pytest.raises(ValueError, match=r"'bag\.weight'.*EmbeddingBag\(sparse=True\).*SparseAdam"):
        lit_decay.configure_adam(model, weight_decay=WD, mode=mode, exclude_embeddings=True)
    model.tokens.sparse = model.bag.sparse = False
    assert lit_decay.configure_adam(model, weight_decay=WD, mode=mode).defaults["fused"] is True


def test_scheduler_callable_and_lightning_config() -> None:
    built = lit_decay.configure_adam(Net(), scheduler=step_lr)
    assert set(built) == {"optimizer", "lr_scheduler"}
    assert isinstance(built["lr_scheduler"], torch.optim.lr_scheduler.StepLR)
    assert built["lr_scheduler"].optimizer is built["optimizer"]

    config = {"scheduler": step_lr, "interval": "step", "frequency": 2, "name": "lr"}
    built = lit_decay.configure_adam(Net(), scheduler=config)
    assert set(built) == {"optimizer", "lr_scheduler"}
    lr_config = built["lr_scheduler"]
    assert lr_config["interval"] == "step" and lr_config["frequency"] == 2 and lr_config["name"] == "lr"
    assert isinstance(lr_config["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert lr_config["scheduler"].optimizer is built["optimizer"]
    assert config["scheduler"] is step_lr  # the user's dict is not modified


BAD_ARGUMENTS = [
    ({"mode": "l3"}, ValueError, r"mode='l3'.*'decoupled_l1'"),
    ({"mode": None}, ValueError, r"mode=None"),
    ({"lr": -0.1}, ValueError, r"lr.*-0\.1"),
    ({"lr": math.nan}, ValueError, r"lr.*nan"),
    ({"lr": math.inf}, ValueError, r"lr.*inf"),
    ({"eps": -1e-8}, ValueError, r"eps.*-1e-08"),
    ({"eps": math.nan}, ValueError, r"eps.*nan"),
    ({"weight_decay": -0.1}, ValueError, r"weight_decay.*-0\.1"),
    ({"weight_decay": math.nan}, ValueError, r"weight_decay.*nan"),
    ({"weight_decay": math.inf}, ValueError, r"weight_decay.*inf"),
    ({"betas": (1.0, 0.999)}, ValueError, r"betas\[0\]=1\.0.*\[0, 1\)"),
    ({"betas": (-0.1, 0.999)}, ValueError, r"betas\[0\]=-0\.1"),
    ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\]=1\.0"),
    ({"betas": (0.9, math.nan)}, ValueError, r"betas\[1\]=nan"),
    ({"betas": (0.9,)}, ValueError, r"betas.*pair.*\(0\.9,\)"),
    ({"betas": 0.9}, ValueError, r"betas.*pair.*0\.9"),
    ({"amsgrad": "no"}, TypeError, r"amsgrad must be True or False; got 'no' of type str"),
    ({"amsgrad": 1}, TypeError, r"amsgrad must be True or False; got 1 of type int"),
    ({"exclude_1d": "false"}, TypeError, r"exclude_1d must be True or False; got 'false'"),
    ({"exclude_embeddings": None}, TypeError, r"exclude_embeddings must be True or False; got None"),
    ({"lr": "0.1"}, TypeError, r"lr must be a finite number >= 0; got '0\.1' of type str"),
    ({"betas": (np.float32(0.9), 1.0)}, ValueError, r"betas\[1\]=1\.0"),
    ({"fused": "yes"}, ValueError, r"fused='yes'"),
    ({"fused": 1.5}, ValueError, r"fused=1\.5"),
    ({"scheduler": 5}, TypeError, r"scheduler.*got 5"),
    ({"scheduler": {"interval": "step"}}, TypeError, r"scheduler.*'interval': 'step'"),
    ({"verbose": "no"}, TypeError, r"verbose must be True or False; got 'no'"),
    ({"weight_decay": 1e308}, ValueError, r"group 'decay': lr·weight_decay = 0\.001 × 1e\+308.*≥ 1.*sign flips"),
    ({"lr": 2.0, "weight_decay": 0.5}, ValueError, r"lr·weight_decay = 2 × 0\.5 = 1 ≥ 1 in decoupled mode"),
    ({"overrides": [{"pattern": "head.*", "name": "a/b"}]}, ValueError, r"'a/b'"),
]


def test_numpy_and_other_real_numbers_are_accepted() -> None:
    """Hyperparameters often come from numpy (a sweep, a config): np.float32(0.9) is a valid beta."""
    optimizer = lit_decay.configure_adam(
        Net(),
        lr=np.float32(0.01),
        weight_decay=np.float64(0.1),
        betas=(np.float32(0.9), np.float64(0.99)),
        eps=Fraction(1, 10**8),
        amsgrad=np.bool_(True),
        exclude_1d=np.bool_(False),
        overrides=[{"pattern": "head.*", "lr_scale": np.int64(2), "weight_decay": np.float32(0.5)}],
    )
    group = optimizer.param_groups[0]
    assert type(group["lr"]) is float and group["lr"] == pytest.approx(0.01)
    assert group["betas"] == pytest.approx((0.9, 0.99)) and all(type(b) is float for b in group["betas"])
    assert group["amsgrad"] is True and group["weight_decay"] == pytest.approx(0.1)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.02)
    # exclude_1d=np.bool_(False) is False: biases and the LayerNorm stay out of decay by their own rules.
    assert "body.0.bias" in optimizer.state_dict()["param_groups"][1]["param_names"]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGUMENTS, ids=[str(k) for k, _, _ in BAD_ARGUMENTS])
def test_bad_arguments_name_the_value(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        lit_decay.configure_adam(Net(), **kwargs)


def test_module_and_override_errors_reach_configure_adam() -> None:
    frozen = Net().requires_grad_(False)
    with pytest.raises(ValueError, match=r"Net has no trainable parameters.*frozen.*body\.0\.weight"):
        lit_decay.configure_adam(frozen)
    with pytest.raises(ValueError, match=r"overrides\[0\] mode='l5'"):
        lit_decay.configure_adam(Net(), overrides=[{"pattern": "head.*", "mode": "l5"}])
    with pytest.raises(ValueError, match=r"overrides\[0\] weight_decay.*-1"):
        lit_decay.configure_adam(Net(), overrides=[{"pattern": "head.*", "weight_decay": -1.0}])
    with pytest.raises(ValueError, match=r"nothing\.\*|matches no"):
        lit_decay.configure_adam(Net(), overrides=[{"pattern": "nothing.*"}])


def test_errors_leave_no_optimizer_or_hooks_behind() -> None:
    model = WithComplex()
    for kwargs, error, _ in [*BAD_ARGUMENTS, ({"fused": True}, ValueError, None)]:
        with pytest.raises(error):
            lit_decay.configure_adam(model, **{"weight_decay": WD, "mode": "l1", **kwargs})
    gc.collect()
    ours = {id(p) for p in model.parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some of torch's deprecated module aliases warns
        optimizers = [obj for obj in gc.get_objects() if isinstance(obj, torch.optim.Optimizer)]
    for obj in optimizers:
        held = {id(p) for g in obj.param_groups for p in g["params"]}
        assert not held & ours, f"a {type(obj).__name__} over the model survived a failed configure_adam"


# --------------------------------------------------------------------------------------------------------------------
# No host synchronisation from the L1 terms
# --------------------------------------------------------------------------------------------------------------------

SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "equal"}


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def recording_step(optimizer: torch.optim.Optimizer) -> OpRecorder:
    """Make ``optimizer.step`` record the aten ops it runs (hooks included), whoever calls it."""
    recorder = OpRecorder()
    step = optimizer.step

    def recorded(*args, **kwargs):
        with recorder:
            return step(*args, **kwargs)

    optimizer.step = recorded
    return recorder


def test_op_recorder_sees_a_host_sync() -> None:
    with OpRecorder() as recorder:
        float(torch.ones(()) * 2)
    assert "_local_scalar_dense" in recorder.ops


def recorded_steps(mode: str, scaled: bool) -> list[str]:
    model = Net()
    optimizer = lit_decay.configure_adam(model, lr=LR, weight_decay=WD, mode=mode, fused=True)
    recorder = recording_step(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
    for x, y in batches(2, torch.float32):
        optimizer.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
    return recorder.ops


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad-scaler"])
@pytest.mark.parametrize("mode", ["l1", "decoupled_l1"])
def test_l1_modes_add_no_host_sync_to_the_step(mode: str, scaled: bool) -> None:
    ops = recorded_steps(mode, scaled)
    assert "_fused_adam_" in ops
    # The hook's own work ran under the recorder: more ops than the same steps without a penalty.
    assert len(ops) > len(recorded_steps("none", scaled))
    assert not SYNCING & set(ops), sorted(SYNCING & set(ops))
