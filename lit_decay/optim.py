"""``lit_decay.Adam``: torch's Adam with each group's decay mode applied around its arithmetic.

``Adam.step`` runs, for each group, its mode's ``before`` transform, torch's own Adam arithmetic
(``torch.optim.adam.adam``: fused, multi-tensor or per-tensor, exactly as ``torch.optim.Adam.step`` calls it) with the
part of the decay torch applies, then its mode's ``after`` transform (``lit_decay.modes``). The penalty is the class's
behaviour, not a hook: copies (``copy.deepcopy``, pickling) keep it, and ``state_dict`` is torch Adam's.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.adam import adam
from torch.utils.hooks import RemovableHandle

from lit_decay._checks import check_betas, check_bool, check_fused, check_group, check_non_negative
from lit_decay._tensors import local
from lit_decay.grouping import GroupingOptions, GroupingReport, plan, show
from lit_decay.modes import DECAY_MODES, DecayMode

#: Called as ``observer(optimizer, group)`` right after torch's Adam arithmetic of a group and before its mode's
#: ``after`` transform: the one moment its weights, state and the transform still to come are all known.
UpdateObserver = Callable[["Adam", dict[str, Any]], None]


def _supported(kind: str) -> frozenset[str]:
    from torch.optim import optimizer

    if kind == "fused":
        return frozenset(optimizer._get_fused_kernels_supported_devices())
    return frozenset(optimizer._get_foreach_kernels_supported_devices())


def _named(params: Iterable[Any]) -> list[tuple[str, torch.Tensor]]:
    """Every ``(name, tensor)`` of params in any form torch takes (tensors, named pairs, groups of either)."""
    found: list[tuple[str, torch.Tensor]] = []
    for entry in params:
        if isinstance(entry, Mapping):
            found += _named([entry["params"]] if isinstance(entry["params"], torch.Tensor) else entry["params"])
        else:
            found.append((str(entry[0]), entry[1]) if isinstance(entry, tuple) else (f"params[{len(found)}]", entry))
    return found


def choose_implementation(named: Iterable[tuple[str, torch.Tensor]], fused: bool | None) -> dict[str, bool]:
    """Torch's Adam implementation keywords (``fused``, ``foreach``) for these parameters.

    ``fused=None`` takes the fused kernel whenever every parameter's device and dtype allow it, else torch's
    multi-tensor kernels where they are real kernels (CUDA, XPU) and its per-tensor loop elsewhere. ``fused=True``
    raises, naming the first parameter that rules the fused kernel out.

    Examples:
        >>> choose_implementation([("w", torch.zeros(2, requires_grad=True))], None)
        {'fused': True, 'foreach': False}
    """
    fused = check_fused(fused)
    named = list(named)
    devices = _supported("fused")
    blocker = next(
        (
            (name, t)
            for name, t in named
            if t.device.type not in devices or not torch.is_floating_point(t) or local(t).is_sparse
        ),
        None,
    )
    if fused is not False and blocker is None:
        return {"fused": True, "foreach": False}
    if fused and blocker is not None:
        name, tensor = blocker
        raise ValueError(
            f"fused=True but torch's fused Adam kernel cannot take parameter {name!r} (device={tensor.device.type}, "
            f"dtype={tensor.dtype}, layout={tensor.layout}); it needs dense floating-point tensors on one of "
            f"{', '.join(sorted(devices))}. Use fused=None to fall back where it cannot run."
        )
    return {"fused": False, "foreach": all(t.device.type in _supported("foreach") for _, t in named)}


def describe_implementation(optimizer: Optimizer) -> str:
    """In words, which Adam kernel ``optimizer`` runs: ``"fused"``, ``"foreach"`` or ``"for-loop"``.

    Examples:
        >>> describe_implementation(torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True))
        'fused'
    """
    if optimizer.defaults.get("fused"):
        return "fused"
    return "foreach" if optimizer.defaults.get("foreach") else "for-loop"


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` that applies each param group's ``"decay_mode"`` around torch's own Adam arithmetic.

    A group's ``"weight_decay"`` is its strength in every mode (a scheduler or loop that writes it, 0 included, sets
    the strength from the next step on); groups without ``"decay_mode"`` take ``mode``. ``l2`` and ``decoupled`` are
    torch's own terms (``Adam(weight_decay=)``, ``AdamW``); ``l1`` adds ``wd·sign(p)`` to the gradients after the
    closure ran (so after clipping, and in a GradScaler's units), ``decoupled_l1`` soft-thresholds the weights after
    the step (exact zeros; nothing on a step the scaler skipped). ``fused=None`` takes torch's fused kernel wherever
    every parameter allows it. The modes are the class's ``modes`` table (``lit_decay.modes.DECAY_MODES``): a
    subclass may extend it.

    Built by ``lit_decay.configure_adam``, a plain group added later (Lightning's ``BackboneFinetuning``) is split by
    the same grouping rules into named groups, keeping its own settings (lr, ...).

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> import lit_decay
        >>> optimizer = Adam(lit_decay.param_groups(model, weight_decay=0.1, mode="decoupled_l1"), lr=0.01)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> optimizer.step()
        >>> [(g["name"], g["decay_mode"], g["weight_decay"]) for g in optimizer.param_groups]
        [('decay', 'decoupled_l1', 0.1), ('no_decay', 'none', 0.0)]
    """

    modes: ClassVar[Mapping[str, DecayMode]] = DECAY_MODES

    # torch.optim.Adam's own arguments, and the default decay mode of groups that do not name one.
    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        mode: str = "decoupled",
        fused: bool | None = None,
    ) -> None:
        # Lists, so that reading the parameters here leaves them for torch (a group may hold a generator).
        params = [{**g, "params": _listed(g["params"])} if isinstance(g, Mapping) else g for g in params]
        self._mode = self._check_mode(mode, "mode")
        super().__init__(
            params,
            lr=check_non_negative("lr", lr),
            betas=check_betas(betas),
            eps=check_non_negative("eps", eps),
            weight_decay=check_non_negative("weight_decay", weight_decay),
            amsgrad=check_bool("amsgrad", amsgrad),
            decoupled_weight_decay=self.modes[mode].torch_term == "decoupled",
            **choose_implementation(_named(params), fused),
        )
        self.defaults["decay_mode"] = mode
        self._init_owned_state()

    def _init_owned_state(self) -> None:
        # Kept between steps by this optimizer alone; not part of state_dict (torch Adam's) nor of copies.
        self._update_observers: OrderedDict[int, UpdateObserver] = OrderedDict()
        #: The module and options ``configure_adam`` grouped, so that groups added later are split alike.
        self.grouping_source: tuple[nn.Module, GroupingOptions] | None = getattr(self, "grouping_source", None)
        #: The grouping report ``configure_adam`` made (None for an optimizer built by hand).
        self.grouping_report: GroupingReport | None = getattr(self, "grouping_report", None)
        self._summary: str | None = None  # shown at the first step: once per fit, not once per configure call

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_owned_state()

    def _check_mode(self, mode: Any, what: str) -> str:
        if not isinstance(mode, str) or mode not in self.modes:
            valid = ", ".join(repr(m) for m in self.modes)
            raise ValueError(f"{what}={mode!r} is not a decay mode; valid modes are {valid}")
        return mode

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, checking the group's decay settings first; a group of plain tensors added to
        an optimizer built by ``configure_adam`` is split by its grouping rules into named groups."""
        members = param_group["params"]
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        plain = bool(members) and all(isinstance(p, torch.Tensor) for p in members)
        source = getattr(self, "grouping_source", None)
        groups = [{**param_group, "params": members}]
        if plain and source is not None:
            groups = self._split(groups[0], *source)
        elif plain and self.param_groups and "param_names" in self.param_groups[0]:
            raise ValueError(
                "this optimizer's groups carry parameter names, and the added group holds plain tensors; give "
                "(name, tensor) pairs, build the optimizer with lit_decay.configure_adam (which splits added groups "
                "by its grouping rules), or add them with lit_decay.add_param_groups(optimizer, module)"
            )
        defaults = getattr(self, "defaults", {})
        held = {id(p) for g in self.param_groups for p in g["params"]}
        for group in groups:  # every part checked before any is added: a refused group leaves nothing behind
            if any(id(p if isinstance(p, torch.Tensor) else p[1]) in held for p in group["params"]):
                raise ValueError("some parameters of the added group are already in this optimizer's groups")
            mode = group.setdefault("decay_mode", defaults.get("decay_mode", self._mode))
            self._check_mode(mode, "decay_mode")
            group["decoupled_weight_decay"] = self.modes[mode].torch_term == "decoupled"
            check_group(group, defaults, self.modes[mode])
        for group in groups:
            super().add_param_group(group)

    def _split(self, group: dict[str, Any], module: nn.Module, options: GroupingOptions) -> list[dict[str, Any]]:
        added = {id(p) for p in group["params"]}
        lr = group.get("lr", self.defaults["lr"])
        options = replace(
            options,
            weight_decay=group.get("weight_decay", options.weight_decay),
            mode=group.get("decay_mode", options.mode),
            lr=lr,
        )
        taken = {str(g.get("name")) for g in self.param_groups}
        settings = {k: v for k, v in group.items() if k not in ("params", "weight_decay", "decay_mode", "name")}
        made_groups = plan(module, options).groups()
        # Named after the module the added tensors share (e.g. "backbone.decay"), as add_param_groups names them.
        prefix = _common_prefix([n for g in made_groups for n, p in g["params"] if id(p) in added])
        split = []
        for made in made_groups:
            params = [(n, p) for n, p in made["params"] if id(p) in added]
            if not params:
                continue
            name = base = f"{prefix}.{made['name']}" if prefix else str(made["name"])
            suffix = 0
            while name in taken:
                suffix += 1
                name = f"{base}-{suffix}"
            taken.add(name)
            # The added group's own settings (lr, betas...), then the split's decay keys (and an lr_scale's lr).
            split.append({**settings, **made, "name": name, "params": params})
        missing = added - {id(p) for g in split for _, p in g["params"]}
        if missing:
            raise ValueError(
                f"{len(missing)} added tensor(s) are not trainable parameters of {type(module).__name__}, the module "
                "configure_adam grouped; add them as (name, tensor) pairs in a group of their own"
            )
        return split

    def register_update_observer(self, observer: UpdateObserver) -> RemovableHandle:
        """Call ``observer(optimizer, group)`` for each group at every step, right after torch's Adam arithmetic and
        before the group's mode applies its ``after`` transform (the monitor measures there)."""
        handle = RemovableHandle(self._update_observers)
        self._update_observers[handle.id] = observer
        return handle

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Adam step of every group, each with its mode's transforms around torch's arithmetic."""
        loss = None
        if closure is not None:
            # The gradients exist only once the closure ran (Lightning clips inside it): the terms come after.
            with torch.enable_grad():
                loss = closure()
        if self._summary is not None:
            show(self._summary)
            self._summary = None
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        mode = self.modes[group["decay_mode"]]
        # Collected as torch.optim.Adam.step collects them: with a gradient, their moments and step counts.
        lists: list[list[torch.Tensor]] = [[] for _ in range(6)]
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
        has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        strength = group["weight_decay"]
        acts = bool(params) and bool(strength)
        foreach = acts and params[0].device.type in _supported("foreach")
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if mode.before is not None and acts:
            # The fused kernel unscales the gradients itself: the term is added in their (scaled) units.
            scaled = strength if grad_scale is None else _wide(grad_scale, params[0].dtype) * strength
            mode.before(_local(params), _local(grads), scaled, foreach)
        adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            has_complex=has_complex,
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            weight_decay=strength if mode.torch_term != "none" else 0.0,
            decoupled_weight_decay=mode.torch_term == "decoupled",
            grad_scale=grad_scale,
            found_inf=found_inf,
            **{key: group[key] for key in _PASSED_AS_THEY_ARE},
        )
        for observer in list(self._update_observers.values()):
            observer(self, group)
        if mode.after is not None and acts:
            threshold = group["lr"] * strength
            if found_inf is not None:  # a skipped step changes nothing; decided on the device, without a sync
                threshold = (1.0 - _wide(found_inf, params[0].dtype)) * threshold
            mode.after(_local(params), threshold, foreach)


# The group keys torch.optim.Adam.step hands torch.optim.adam.adam as they are.
_PASSED_AS_THEY_ARE = ("amsgrad", "lr", "eps", "maximize", "foreach", "capturable", "differentiable", "fused")


def _listed(params: Any) -> Any:
    return params if isinstance(params, torch.Tensor) else list(params)


def _wide(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scaler's float32 scalar in the arithmetic dtype of ``dtype`` parameters (float64 for float64, where the
    device has it), so a float64 parameter's term is not rounded to float32."""
    wide = torch.float64 if dtype == torch.float64 and tensor.device.type != "mps" else torch.float32
    return tensor.to(wide)


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    # DTensor shards (FSDP2) take elementwise work on their local part; plain tensors, the usual case, as they are.
    if all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors):
        return tensors
    return [local(t) for t in tensors]


def _common_prefix(names: list[str]) -> str:
    """The dotted module path all ``names`` share (``"backbone"`` for ``backbone.0.weight``, ``backbone.1.bias``)."""
    columns = zip(*(name.split(".")[:-1] for name in names))
    return ".".join(c[0] for c in itertools.takewhile(lambda segments: len(set(segments)) == 1, columns))
