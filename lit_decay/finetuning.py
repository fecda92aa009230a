"""Fine-tuning that unfreezes layers mid-run: new param groups, split and named like ``configure_adam``'s.

Lightning's ``BaseFinetuning.unfreeze_and_add_param_group`` adds one group of plain tensors. The ``lit_decay.Adam`` that
``configure_adam`` returns splits such a group by its own grouping rules, so Lightning's callbacks work unchanged.
``add_param_groups`` is the explicit form for any optimizer (torch's own refuses to mix named and unnamed groups, and
would decay the backbone's biases and norm layers): a module's newly trainable parameters as the same split groups
(``"backbone.decay"``, ``"backbone.no_decay"``, ...), with their names. ``DecayBackboneFinetuning`` is Lightning's
``BackboneFinetuning`` on top of it, which also moves every backbone group's lr at each epoch (Lightning's writes only
the last group's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from lit_decay._checks import check_non_negative
from lit_decay.configure import check_parameters
from lit_decay.grouping import DECAY, GroupingOptions, plan
from lit_decay.modes import DECAY_MODES


def _inherited_decay(optimizer: Optimizer) -> tuple[float, str] | None:
    """The coefficient and mode of the optimizer's ``"decay"`` group, if it has one built by lit_decay."""
    for group in optimizer.param_groups:
        if group.get("name") == DECAY and "decay_mode" in group:
            return float(group["weight_decay"]), str(group["decay_mode"])
    return None


# The grouping options of param_groups, each defaulting to what the optimizer's "decay" group already uses.
def add_param_groups(
    optimizer: Optimizer,
    module: nn.Module,
    *,
    prefix: str = "",
    lr: float | None = None,
    weight_decay: float | None = None,
    mode: str | None = None,
    exclude_embeddings: bool = False,
    exclude_1d: bool = True,
    overrides: Iterable[Mapping[str, Any]] | None = (),
) -> list[dict[str, Any]]:
    """Add ``module``'s trainable parameters that ``optimizer`` does not hold yet, as split, named param groups.

    The groups follow ``lit_decay.param_groups`` (biases, norm layers and other no-decay parameters apart), are named
    ``"{prefix}.{group}"`` (``"{group}"`` without a prefix) and carry the parameters' names prefixed with ``prefix``,
    so they match the names the optimizer already has when ``prefix`` is the module's name in the model.
    ``weight_decay`` and ``mode`` default to those of the optimizer's ``"decay"`` group; ``lr`` to the optimizer's
    default lr. Returns the groups added (none when every trainable parameter is already in the optimizer). A
    ``lit_decay.Adam`` made by ``configure_adam`` also splits a plain ``add_param_group`` by itself; this is the
    explicit form, for any optimizer, with the group names' prefix chosen.

    Examples:
        >>> import torch, lit_decay
        >>> backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> model = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(4, 2)})
        >>> _ = model["backbone"].requires_grad_(False)
        >>> optimizer = lit_decay.configure_adam(model, lr=1e-3, weight_decay=0.1)
        >>> _ = model["backbone"].requires_grad_(True)
        >>> added = add_param_groups(optimizer, model["backbone"], prefix="backbone", lr=1e-4)
        >>> [(g["name"], g["weight_decay"], g["lr"]) for g in added]
        [('backbone.decay', 0.1, 0.0001), ('backbone.no_decay', 0.0, 0.0001)]
        >>> added[1]["param_names"]
        ['backbone.0.bias', 'backbone.1.weight', 'backbone.1.bias']
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer; got {type(optimizer).__name__}")
    if lr is not None:
        lr = check_non_negative("lr", lr)
    if weight_decay is None or mode is None:
        inherited = _inherited_decay(optimizer)
        if inherited is None:
            raise ValueError(
                "the optimizer has no lit_decay 'decay' group to take the decay from; pass weight_decay= and mode="
            )
        weight_decay = inherited[0] if weight_decay is None else weight_decay
        mode = inherited[1] if mode is None else mode
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(p.requires_grad and id(p) not in held for p in module.parameters()):
        return []
    base_lr = lr if lr is not None else optimizer.defaults["lr"]
    options = GroupingOptions(weight_decay, mode, exclude_embeddings, exclude_1d, overrides, base_lr)
    groups = plan(module, options).groups()
    check_parameters(module, groups, getattr(optimizer, "modes", DECAY_MODES))
    added = []
    for group in groups:
        params = [(_joined(prefix, name), p) for name, p in group["params"] if id(p) not in held]
        if not params:
            continue
        group = {**group, "name": _joined(prefix, group["name"]), "params": params}
        if lr is not None and "lr" not in group:
            group["lr"] = lr
        optimizer.add_param_group(group)
        added.append(optimizer.param_groups[-1])
    return added


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def module_prefix(root: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``root`` (``""`` for ``root`` itself).

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
        >>> module_prefix(model, model[1])
        '1'
    """
    for name, candidate in root.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


class DecayBackboneFinetuning(BackboneFinetuning):
    """Lightning's ``BackboneFinetuning``, unfreezing the backbone into split, named groups.

    At ``unfreeze_backbone_at_epoch`` the backbone's parameters are added with ``add_param_groups`` (groups
    ``"backbone.decay"``, ``"backbone.no_decay"``, ... at the backbone lr, decay taken from the optimizer's ``"decay"``
    group), and each later epoch's backbone lr is written into all of them, where ``BackboneFinetuning`` writes only the
    last group. With ``train_bn=False`` the backbone's batch-norm layers stay frozen throughout (Lightning's own
    callback trains them from the first epoch whatever ``train_bn`` says). A run resumed after the unfreeze epoch
    trains the backbone again (Lightning's callback restores its groups but leaves it frozen). Arguments are
    ``BackboneFinetuning``'s, plus ``exclude_embeddings``, ``exclude_1d`` and ``overrides`` for the grouping (patterns
    relative to the backbone).

    Example::

        trainer = L.Trainer(callbacks=[lit_decay.DecayBackboneFinetuning(unfreeze_backbone_at_epoch=5)])
        # with configure_adam(self, ...) in a LightningModule that has a `backbone` attribute
    """

    def __init__(
        self,
        *args: Any,
        exclude_embeddings: bool = False,
        exclude_1d: bool = True,
        overrides: Iterable[Mapping[str, Any]] | None = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.grouping: dict[str, Any] = {
            "exclude_embeddings": exclude_embeddings,
            "exclude_1d": exclude_1d,
            "overrides": overrides,
        }
        self._prefix = "backbone"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        backbone = getattr(pl_module, "backbone", None)
        if isinstance(backbone, nn.Module):
            self._prefix = module_prefix(pl_module, backbone)
        super().on_fit_start(trainer, pl_module)

    def _make_trainable(self, backbone: nn.Module) -> None:
        leaves = BaseFinetuning.flatten_modules(backbone)
        BaseFinetuning.make_trainable([m for m in leaves if self.train_bn or not isinstance(m, _BatchNorm)])

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        # BackboneFinetuning freezes with train_bn=True whatever it was given, so its BatchNorm layers train from the
        # first epoch; here train_bn=False keeps them frozen throughout.
        self.freeze(pl_module.backbone, train_bn=self.train_bn)

    def unfreeze_and_add_param_group(  # type: ignore[override]
        self,
        modules: nn.Module,
        optimizer: Optimizer,
        lr: float | None = None,
        initial_denom_lr: float = 10.0,
        train_bn: bool = True,
    ) -> None:
        leaves = BaseFinetuning.flatten_modules(modules)
        BaseFinetuning.make_trainable([m for m in leaves if train_bn or not isinstance(m, _BatchNorm)])
        params_lr = optimizer.param_groups[0]["lr"] / initial_denom_lr if lr is None else float(lr)
        add_param_groups(optimizer, modules, prefix=self._prefix, lr=params_lr, **self.grouping)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        super().finetune_function(pl_module, epoch, optimizer)
        if epoch > self.unfreeze_backbone_at_epoch:
            # A run resumed after the unfreeze epoch gets the backbone's groups back from the checkpoint
            # (BaseFinetuning), but setup() froze the backbone again and BackboneFinetuning never unfreezes it: it would
            # sit in the optimizer untrained.
            backbone = pl_module.backbone
            assert isinstance(backbone, nn.Module)  # BackboneFinetuning.on_fit_start checked it
            self._make_trainable(backbone)
        if epoch > self.unfreeze_backbone_at_epoch and self.previous_backbone_lr is not None:
            for group in optimizer.param_groups:
                if str(group.get("name", "")).startswith(f"{self._prefix}."):
                    group["lr"] = self.previous_backbone_lr * group.get("lr_scale", 1.0)
