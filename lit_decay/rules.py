"""The decay rules: which trainable tensor goes to which group, and why.

A pure function of the module: ``place_parameters`` walks the module once and returns one ``Placement`` per
trainable tensor (tied tensors once, with their aliases) and the frozen ones apart. The rules, first match wins:

1. ``requires_grad=False`` → frozen, not in the optimizer;
2. an override whose fnmatch pattern matches the dotted name → that override's group;
3. a name returned by ``no_weight_decay()`` of the model or a submodule, a tensor marked ``_no_weight_decay = True``
   (mamba_ssm's convention), or a Mamba mixer's ``A_log``/``D`` in ports that drop that mark → no decay;
4. a parameter owned by a normalization layer (never an embedding, linear or convolution subclass) → no decay;
5. a bias: "bias" is an underscore-separated part of the leaf name (``bias``, ``in_proj_bias``,
   ``relative_position_bias_table``) or of the attribute name of a module owning an embedding table (T5's
   ``relative_attention_bias``) → no decay;
6. a raw token or position-embedding parameter (``cls_token``, ``pos_embed``, ``position_embeddings``, ...) → no
   decay; an embedding table → decay, or no decay with ``exclude_embeddings=True``;
7. any other parameter that is a vector once its size-1 dimensions are dropped (``ndim <= 1``, or per-channel such
   as ``(1, 1, 1, C)`` and ``(C, 1, 1, 1)``), unless it is the weight of a linear, convolution or embedding layer
   → no decay, unless ``exclude_1d=False``;
8. everything else → decay.

Wrappers (DDP, DataParallel, FSDP1, ``torch.compile``, activation checkpointing, Lightning's strategy wrapper) are
seen through, so names are the ones the user wrote. A parametrized tensor (``torch.nn.utils.parametrize``, stored as
``<module>.parametrizations.<name>.original``) gets the rules of the parameter ``<module>.<name>`` it stands for.

An override also sets its group's ``GroupSettings`` (mode, coefficient, lr_scale): the one type of a group's
settings, which ``lit_decay.grouping`` writes into the optimizer's groups and into the report.

For layer-wise learning-rate decay, ``find_layers`` numbers every parameter by the block it is in (``Layers``).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lit_decay._checks import check_mode, check_non_negative
from lit_decay.modes import DECAY_MODES

DECAY = "decay"
NO_DECAY = "no_decay"

# Private attribute names under which wrappers keep the module they wrap. A plain ``module`` attribute is only taken
# for data-parallel wrappers (DDP, DataParallel and look-alikes), since a user's model may well have one.
_ROOT_WRAPPER_ATTRIBUTES = ("_orig_mod", "_forward_module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
# Name segments that wrappers insert inside a model; they never belong to the name a user wrote.
_INNER_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})

_TORCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm and their lazy forms
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
_EMBEDDINGS: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
# Layers that hold weight matrices whatever their class is called (transformers has several ``*NormedEmbedding``s).
_NEVER_NORMALIZATION: tuple[type[nn.Module], ...] = (*_EMBEDDINGS, nn.Linear, nn.modules.conv._ConvNd)
# mamba_ssm (``modules/mamba_simple.py``, ``mamba2.py``) marks these ``_no_weight_decay``; ports such as transformers'
# ``MambaMixer``/``Mamba2Mixer`` keep the parameters and drop the mark.
_MAMBA_NO_DECAY = frozenset({"A_log", "D"})
# Raw embedding parameters by the names timm and transformers give them (timm: ``cls_token``, ``dist_token``,
# ``reg_token``, ``pos_embed``, Swin's ``absolute_pos_embed``; transformers: DeiT's ``distillation_token``, DINOv2's
# ``register_tokens``, ViT's ``mask_token`` and raw ``position_embeddings``). The ViT/DeiT/BEiT/Swin recipes keep them
# out of decay; timm's models only get it right because their ``no_weight_decay()`` names them.
_RAW_EMBEDDINGS = {
    "cls_token": "token",
    "dist_token": "token",
    "distillation_token": "token",
    "reg_token": "token",
    "register_tokens": "token",
    "mask_token": "token",
    "pos_embed": "position",
    "absolute_pos_embed": "position",
    "position_embeddings": "position",
}
# Layers whose ``weight`` is a matrix (or kernel) however thin: a ``Linear(d, 1)`` head is no per-channel scale.
_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd, *_EMBEDDINGS)
# A typo of a parameter's name spells nearly the same (difflib ratio: ``pos_embd``/``pos_embed`` 0.94,
# ``proj.bais``/``proj.bias`` 0.89), unlike a token a timm model may simply not have (``dist_token``/``cls_token``
# 0.74, ``reg_token``/``cls_token`` 0.67).
_TYPO_RATIO = 0.8

# torch.nn.utils.parametrize keeps ``<module>.<name>`` as ``<module>.parametrizations.<name>.original`` (or
# ``original0``, ``original1``, ... when the parametrization's right_inverse returns several tensors).
_PARAMETRIZED = re.compile(r"(?:(?P<path>.*)\.)?parametrizations\.(?P<leaf>[^.]+)\.original\d*")

OVERRIDE_KEYS = ("pattern", "name", "weight_decay", "lr_scale", "mode")

# The rules' numbers, as in the module docstring (1, frozen, never makes a placement).
RULE_OVERRIDE, RULE_NO_WEIGHT_DECAY, RULE_NORMALIZATION, RULE_BIAS, RULE_EMBEDDING, RULE_1D, RULE_DEFAULT = range(2, 9)


@dataclass(frozen=True)
class GroupSettings:
    """The settings of one param group: made from an override (or for ``"decay"``/``"no_decay"``, from the options),
    written into the optimizer's group, and shown in the report's group table.

    ``coefficient`` is the decay strength the user asked for, whatever the mode. ``lr_scale`` multiplies the base
    learning rate; ``None`` means the group has no lr of its own (it takes the optimizer's).

    Examples:
        >>> head = GroupSettings("head", "decoupled", 0.1, lr_scale=10.0)
        >>> head.scaled_lr(1e-3), head.timescale(1e-3)
        (0.01, 1000.0)
        >>> GroupSettings("no_decay", "none", 0.0).timescale(1e-3) is None
        True
    """

    name: str
    mode: str
    coefficient: float
    lr_scale: float | None = None

    def scaled_lr(self, base_lr: float) -> float:
        """This group's learning rate when the optimizer's is ``base_lr``."""
        return base_lr if self.lr_scale is None else base_lr * self.lr_scale

    def timescale(self, base_lr: float) -> float | None:
        """τ = 1/(lr·wd), in optimizer steps, of a decoupled group decayed at all; else None.

        Only AdamW's decay ``w ← w·(1 − lr·wd)`` shrinks every weight by the same factor, so only there is τ the
        number of steps over which the weights forget their past (the other modes' decay depends on the weights).
        """
        rate = self.scaled_lr(base_lr) * self.coefficient
        if not DECAY_MODES[self.mode].timescale or rate <= 0:
            return None
        return 1.0 / rate


@dataclass(frozen=True)
class Override:
    """One validated entry of ``overrides=``: parameters whose dotted name matches ``pattern`` form the group
    ``settings.name``, with those settings."""

    pattern: str
    settings: GroupSettings

    @property
    def name(self) -> str:
        """The name of the override's group."""
        return self.settings.name


@dataclass(frozen=True)
class Placement:
    """Where one trainable tensor goes: its group, and the rule that decided (its number above, and in words).

    ``norm_by_name`` is True for a tensor with ``ndim >= 2`` that rule 4 kept out of decay only because its module's
    class name contains "Norm": the one placement of the heuristic worth a second look.
    """

    name: str
    tensor: torch.Tensor
    group: str
    reason: str
    aliases: tuple[str, ...] = ()
    rule: int = RULE_DEFAULT
    norm_by_name: bool = False


@dataclass(frozen=True)
class _Decision:
    group: str
    reason: str
    rule: int
    override_index: int = -1
    norm_by_name: bool = False


@dataclass(frozen=True)
class _Site:
    """Where a parameter sits for the rules: its name and owner, or for a parametrized tensor, the name of the
    parameter it stands for and the module that parameter belongs to."""

    name: str
    owner: nn.Module
    parametrized: bool = False


def unwrap(module: nn.Module) -> nn.Module:
    """The module a wrapper (DDP, DataParallel, FSDP1, ``torch.compile``, Lightning's wrapper) holds, else ``module``.

    A root is treated as a wrapper when it has no parameters of its own and exactly one child, kept under one of the
    private attribute names such wrappers use, or under ``module`` in a class named ``*DataParallel``.

    Examples:
        >>> inner = nn.Linear(2, 2)
        >>> unwrap(torch.compile(inner)) is inner
        True
    """
    while True:
        children = dict(module.named_children())
        if len(children) != 1 or any(True for _ in module.parameters(recurse=False)):
            return module
        (attribute, child) = next(iter(children.items()))
        data_parallel = attribute == "module" and type(module).__name__.endswith("DataParallel")
        if attribute not in _ROOT_WRAPPER_ATTRIBUTES and not data_parallel:
            return module
        module = child


def clean_name(name: str) -> str:
    """``name`` without the segments wrappers insert inside a model.

    Examples:
        >>> clean_name("blocks.0._checkpoint_wrapped_module.attn.weight")
        'blocks.0.attn.weight'
    """
    return ".".join(part for part in name.split(".") if part not in _INNER_WRAPPER_SEGMENTS)


def is_normalization(module: nn.Module) -> bool:
    """True for torch's normalization layers and for any module class whose name contains ``"Norm"``, except
    embedding, linear and convolution layers (a ``NormedEmbedding`` is an embedding table).

    Examples:
        >>> is_normalization(nn.LayerNorm(4)), is_normalization(nn.Linear(4, 4))
        (True, False)
    """
    if isinstance(module, _NEVER_NORMALIZATION):
        return False
    return isinstance(module, _TORCH_NORMS) or "Norm" in type(module).__name__


def is_bias_name(leaf: str) -> bool:
    """True when ``"bias"`` is one of the underscore-separated parts of ``leaf``: torch's ``bias``, ``in_proj_bias``,
    ``bias_ih_l0``, ``bias_k``, and tables such as Swin's ``relative_position_bias_table``.

    Examples:
        >>> [is_bias_name(n) for n in ("bias", "in_proj_bias", "relative_position_bias_table", "weight", "biased")]
        [True, True, True, False, False]
    """
    return "bias" in leaf.split("_")


def is_vector(tensor: torch.Tensor) -> bool:
    """True for a tensor that is a vector (or a scalar) once its size-1 dimensions are dropped: ``ndim <= 1``, or a
    per-channel shape such as ConvNeXt-V2's GRN ``(1, 1, 1, C)`` or an NFNet conv gain ``(C, 1, 1, 1)``.

    Examples:
        >>> [is_vector(torch.empty(shape)) for shape in ((), (8,), (1, 1, 1, 8), (8, 1, 1, 1), (1, 8, 8))]
        [True, True, True, True, False]
    """
    return sum(size > 1 for size in tensor.shape) <= 1


def _channels(tensor: torch.Tensor) -> str:
    """The shape with its one dimension of size > 1 written ``C``: ``(1, 1, 1, C)``."""
    return "(" + ", ".join("C" if size > 1 else str(size) for size in tensor.shape) + ")"


# One check after another, each naming the entry and key it refuses: long, but each step one plain check.
def parse_overrides(
    overrides: Iterable[Mapping[str, Any]] | None, *, mode: str = "decoupled", weight_decay: float = 0.0
) -> tuple[Override, ...]:
    """Validate ``overrides=`` entries into ``Override`` objects, or raise naming the bad entry.

    An entry without ``"mode"`` or ``"weight_decay"`` takes the ``"decay"`` group's, passed as ``mode`` and
    ``weight_decay`` (already validated). A group name may not contain ``"/"`` (the monitor's tags are
    ``{prefix}/{metric}/{group}``).

    Examples:
        >>> (head,) = parse_overrides([{"pattern": "head.*", "lr_scale": 10.0}], mode="l2", weight_decay=0.1)
        >>> head.name, head.settings
        ('head.*', GroupSettings(name='head.*', mode='l2', coefficient=0.1, lr_scale=10.0))
        >>> parse_overrides([{"pattern": "head.*", "name": "head/fast"}])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: overrides[0] 'name'='head/fast' contains '/', which would break the {prefix}/{metric}/{group} ...
    """
    if overrides is None:
        return ()
    if isinstance(overrides, (Mapping, str)):
        raise TypeError(f"overrides must be a sequence of dicts, e.g. [{{'pattern': 'head.*'}}]; got {overrides!r}")
    parsed: list[Override] = []
    # What each group's first entry wrote itself: two entries naming one group must write the same, so that neither
    # silently loses (compared as written, before the decay group's mode and coefficient fill the gaps).
    written_by_name: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(overrides):
        where = f"overrides[{index}]"
        if not isinstance(entry, Mapping):
            raise TypeError(f"{where} must be a dict with keys {', '.join(OVERRIDE_KEYS)}; got {entry!r}")
        unknown = sorted(set(entry) - set(OVERRIDE_KEYS))
        if unknown:
            raise ValueError(
                f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; valid keys are {', '.join(OVERRIDE_KEYS)}"
            )
        pattern = entry.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(
                f"{where} needs a 'pattern' (an fnmatch pattern on dotted parameter names, e.g. 'head.*'); "
                f"got {entry!r}"
            )
        name = entry.get("name", pattern)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where} 'name' must be a non-empty string; got {name!r}")
        if name in (DECAY, NO_DECAY):
            raise ValueError(f"{where} 'name'={name!r} is reserved for the built-in groups; choose another name")
        if "/" in name:
            # The monitor's tags are {prefix}/{metric}/{group}: a "/" in a group name would read as another level.
            named = f"'name'={name!r}" if "name" in entry else f"group name {name!r} (taken from its pattern)"
            raise ValueError(
                f"{where} {named} contains '/', which would break the {{prefix}}/{{metric}}/{{group}} tags the monitor "
                "logs; give it a 'name' without '/'"
            )
        written: dict[str, Any] = {}
        if "weight_decay" in entry:
            written["weight_decay"] = check_non_negative(f"{where} weight_decay", entry["weight_decay"])
        if "lr_scale" in entry:
            written["lr_scale"] = check_non_negative(f"{where} lr_scale", entry["lr_scale"])
        if "mode" in entry:
            written["mode"] = check_mode(entry["mode"], what=f"{where} mode")
        previous = written_by_name.setdefault(name, written)
        if previous != written:
            raise ValueError(
                f"two overrides name group {name!r} differently: {_describe(previous)} vs {_describe(written)}; "
                "give them different names or the same settings"
            )
        settings = GroupSettings(
            name,
            written.get("mode", mode),
            written.get("weight_decay", weight_decay),
            written.get("lr_scale"),
        )
        parsed.append(Override(pattern, settings))
    return tuple(parsed)


def _describe(written: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{key}={value!r}" for key, value in written.items()) + "}"


def _no_weight_decay_names(root: nn.Module) -> dict[str, str]:
    """Full dotted names (and module-name prefixes or fnmatch patterns) from every ``no_weight_decay()``, with the
    module path that declared each."""
    declared: dict[str, str] = {}
    for path, module in root.named_modules():
        hook = getattr(module, "no_weight_decay", None)
        if not callable(hook):
            continue
        names = hook()
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise TypeError(
                f"no_weight_decay() of {path or type(module).__name__} must return a set of names; got {names!r}"
            )
        prefix = clean_name(path) + "." if path else ""
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"no_weight_decay() of {path or type(module).__name__} returned {name!r}, not a name")
            declared.setdefault(prefix + clean_name(name), clean_name(path))
    return declared


def _matches_entry(name: str, entry: str) -> bool:
    return (
        name == entry
        or name.startswith(entry + ".")
        or (any(c in entry for c in "*?[") and fnmatch.fnmatchcase(name, entry))
    )


def _match_no_weight_decay(names: Iterable[str], declared: Mapping[str, str]) -> str | None:
    for entry, path in declared.items():
        if any(_matches_entry(name, entry) for name in names):
            return f"no_weight_decay() of {path}" if path else "no_weight_decay() of the root module"
    return None


def _unmatched(declared: Mapping[str, str], names: Sequence[str]) -> dict[str, list[str]]:
    """The declared entries that match no name, by the path of the module that declared them."""
    unmatched: dict[str, list[str]] = {}
    for entry, path in declared.items():
        if not any(_matches_entry(name, entry) for name in names):
            unmatched.setdefault(path, []).append(entry)
    return unmatched


def _every_name(sites: Mapping[str, _Site]) -> list[str]:
    """Every name a ``no_weight_decay()`` entry may match: all parameter names, aliases and frozen ones included, and
    the names parametrized tensors stand for."""
    return list(sites) + [site.name for site in sites.values() if site.parametrized]


def unmatched_no_weight_decay(module: nn.Module) -> tuple[str, ...]:
    """The names (full dotted names, sorted) that a ``no_weight_decay()`` of ``module`` or of a submodule returned
    and that match no parameter: nothing is kept out of decay for them.

    timm's ``VisionTransformer.no_weight_decay()`` returns ``{'pos_embed', 'cls_token', 'reg_token', 'dist_token'}``
    whether or not the model has them (``timm/models/vision_transformer.py``), so an entry here is no fault by itself;
    ``place_parameters`` warns only about one that looks like a typo of a parameter's name.

    Examples:
        >>> class Tokens(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        ...
        ...     def no_weight_decay(self):
        ...         return ["cls_token", "dist_token"]
        >>> unmatched_no_weight_decay(Tokens())
        ('dist_token',)
    """
    root = unwrap(module)
    declared = _no_weight_decay_names(root)
    if not declared:
        return ()
    unmatched = _unmatched(declared, _every_name(_sites(root)))
    return tuple(sorted(entry for entries in unmatched.values() for entry in entries))


def _warn_no_weight_decay_typos(root: nn.Module, declared: Mapping[str, str], names: Sequence[str]) -> None:
    """Warn, per declaring module, about ``no_weight_decay()`` names that match no parameter and spell nearly like one
    (a typo such as ``pos_embd`` would otherwise leave the intended tensor decayed without a word). A name unlike any
    parameter's is no typo: timm's models return tokens they may not have (``dist_token``, ``reg_token``)."""
    for path, entries in _unmatched(declared, names).items():
        prefix = path + "." if path else ""
        local = [name[len(prefix) :] for name in names if name.startswith(prefix)]
        relative = sorted(entry[len(prefix) :] for entry in entries)
        typos = [entry for entry in relative if difflib.get_close_matches(entry, local, n=1, cutoff=_TYPO_RATIO)]
        if not typos:
            continue
        # closest first, as difflib ranks them
        nearest = dict.fromkeys(m for entry in typos for m in difflib.get_close_matches(entry, local, n=3, cutoff=0.6))
        owner = type(root.get_submodule(path)).__name__ if path else type(root).__name__
        where = f"{path} ({owner})" if path else f"the root module ({owner})"
        warnings.warn(
            f"no_weight_decay() of {where} returned {', '.join(map(repr, typos))}, matching no parameter, so "
            "nothing is kept out of decay for it (a typo?); nearest parameter names: " + ", ".join(nearest),
            UserWarning,
            stacklevel=5,
        )


def _decide(
    name: str,
    site: _Site,
    tensor: torch.Tensor,
    *,
    overrides: Sequence[Override],
    declared: Mapping[str, str],
    exclude_embeddings: bool,
    exclude_1d: bool,
) -> _Decision:
    for index, override in enumerate(overrides):
        if fnmatch.fnmatchcase(name, override.pattern):
            return _Decision(override.name, f"override {override.name!r} ({override.pattern})", RULE_OVERRIDE, index)
    decision = _decide_by_rules(
        name, site, tensor, declared, exclude_embeddings=exclude_embeddings, exclude_1d=exclude_1d
    )
    if site.parametrized:
        return replace(decision, reason=f"{decision.reason} (parametrized {site.name})")
    return decision


def _decide_by_rules(
    name: str,
    site: _Site,
    tensor: torch.Tensor,
    declared: Mapping[str, str],
    *,
    exclude_embeddings: bool,
    exclude_1d: bool,
) -> _Decision:
    """Rules 3 to 8 for one name of a tensor, read at the parameter the tensor stands for."""
    owner, owner_class = site.owner, type(site.owner).__name__
    path, _, leaf = site.name.rpartition(".")
    reason = _match_no_weight_decay((name, site.name), declared)
    if reason:
        return _Decision(NO_DECAY, reason, RULE_NO_WEIGHT_DECAY)
    if getattr(tensor, "_no_weight_decay", False) is True:
        return _Decision(NO_DECAY, "marked _no_weight_decay (mamba_ssm convention)", RULE_NO_WEIGHT_DECAY)
    if leaf in _MAMBA_NO_DECAY and "Mamba" in owner_class:
        return _Decision(
            NO_DECAY, f"Mamba {leaf} of {owner_class} (mamba_ssm marks it _no_weight_decay)", RULE_NO_WEIGHT_DECAY
        )
    if is_normalization(owner):
        if isinstance(owner, _TORCH_NORMS) or is_vector(tensor):
            return _Decision(NO_DECAY, f"normalization layer {owner_class}", RULE_NORMALIZATION)
        return _Decision(
            NO_DECAY,
            f"normalization layer {owner_class} by class name only, yet ndim={tensor.ndim}: "
            "add an override if this is a weight matrix",
            RULE_NORMALIZATION,
            norm_by_name=True,
        )
    if is_bias_name(leaf):
        if leaf == "bias" or leaf.startswith("bias_") or leaf.endswith("_bias"):
            return _Decision(NO_DECAY, "bias", RULE_BIAS)
        return _Decision(NO_DECAY, "bias table (name part 'bias')", RULE_BIAS)
    attribute = path.rpartition(".")[2]
    if isinstance(owner, _EMBEDDINGS) and is_bias_name(attribute):
        return _Decision(NO_DECAY, f"bias table (embedding {attribute}, name part 'bias')", RULE_BIAS)
    kind = _RAW_EMBEDDINGS.get(leaf)
    if kind is not None and not isinstance(owner, _EMBEDDINGS):
        return _Decision(NO_DECAY, f"{kind} embedding ({leaf})", RULE_EMBEDDING)
    if isinstance(owner, _EMBEDDINGS):
        if exclude_embeddings:
            return _Decision(NO_DECAY, "embedding (exclude_embeddings=True)", RULE_EMBEDDING)
        return _Decision(DECAY, "embedding", RULE_EMBEDDING)
    if is_vector(tensor) and not (leaf == "weight" and isinstance(owner, _WEIGHT_LAYERS)):
        what = f"ndim={tensor.ndim} parameter" if tensor.ndim <= 1 else f"per-channel {_channels(tensor)} parameter"
        if exclude_1d:
            return _Decision(NO_DECAY, what, RULE_1D)
        return _Decision(DECAY, f"{what} (exclude_1d=False)", RULE_DEFAULT)
    return _Decision(DECAY, f"ndim={tensor.ndim} weight", RULE_DEFAULT)


def _sites(root: nn.Module) -> dict[str, _Site]:
    """{clean full name: site} for every parameter name (aliases included)."""
    modules: dict[str, nn.Module] = {}
    for path, sub in root.named_modules(remove_duplicate=False):
        modules[clean_name(path)] = sub  # a wrapper comes before what it wraps, so the innermost module stays
    sites: dict[str, _Site] = {}
    for path, sub in root.named_modules(remove_duplicate=False):
        for leaf, _ in sub.named_parameters(recurse=False, remove_duplicate=False):
            name = clean_name(f"{path}.{leaf}" if path else leaf)
            sites[name] = _Site(name, sub)
            parametrized = _PARAMETRIZED.fullmatch(name)
            if parametrized and isinstance(sub, parametrize.ParametrizationList):
                module_path, stands_for = parametrized["path"] or "", parametrized["leaf"]
                module = modules.get(module_path)
                if module is not None:
                    full = f"{module_path}.{stands_for}" if module_path else stands_for
                    sites[name] = _Site(full, module, parametrized=True)
    return sites


def _combine(names: Sequence[str], decisions: Sequence[_Decision]) -> tuple[_Decision, str]:
    """One decision for a tensor seen under several names: an override wins (first override in order), then any
    exclusion, else the first name's decision. Returns it with the alias that decided."""
    candidates = list(zip(decisions, names))
    overrides = [c for c in candidates if c[0].rule == RULE_OVERRIDE]
    if overrides:
        return min(overrides, key=lambda c: c[0].override_index)
    excluded = [c for c in candidates if c[0].group == NO_DECAY]
    if excluded:
        return min(excluded, key=lambda c: c[0].rule)
    return candidates[0]


def place_parameters(
    module: nn.Module,
    *,
    overrides: Sequence[Override] = (),
    exclude_embeddings: bool = False,
    exclude_1d: bool = True,
) -> tuple[list[Placement], list[tuple[str, torch.Tensor]]]:
    """Place every trainable tensor of ``module`` once; return the placements and the frozen ``(name, tensor)`` pairs.

    Raises ``ValueError`` for an override pattern that matches no trainable parameter.

    Examples:
        >>> placements, frozen = place_parameters(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
        >>> [(p.name, p.group, p.reason) for p in placements]  # doctest: +NORMALIZE_WHITESPACE
        [('0.weight', 'decay', 'ndim=2 weight'), ('0.bias', 'no_decay', 'bias'),
         ('1.weight', 'no_decay', 'normalization layer LayerNorm'),
         ('1.bias', 'no_decay', 'normalization layer LayerNorm')]
    """
    root = unwrap(module)
    declared = _no_weight_decay_names(root)
    sites = _sites(root)
    if declared:
        _warn_no_weight_decay_typos(root, declared, _every_name(sites))

    names_by_tensor, tensors = _names_of_each_tensor(root)
    placements: list[Placement] = []
    frozen: list[tuple[str, torch.Tensor]] = []
    deciding_overrides: set[int] = set()
    for key, names in names_by_tensor.items():
        tensor = tensors[key]
        if isinstance(tensor, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"parameter {names[0]!r} of a lazy module is not initialised yet, so its shape (and whether it is a "
                "weight or a vector) is unknown; run one forward pass before grouping the parameters"
            )
        if not tensor.requires_grad:
            frozen.append((names[0], tensor))
            continue
        decisions = [
            _decide(
                n,
                sites[n],
                tensor,
                overrides=overrides,
                declared=declared,
                exclude_embeddings=exclude_embeddings,
                exclude_1d=exclude_1d,
            )
            for n in names
        ]
        decision, deciding_name = _combine(names, decisions)
        deciding_overrides.add(decision.override_index)
        reason = decision.reason if deciding_name == names[0] else f"{decision.reason} (via alias {deciding_name})"
        placements.append(
            Placement(names[0], tensor, decision.group, reason, tuple(names[1:]), decision.rule, decision.norm_by_name)
        )

    trainable = [names for key, names in names_by_tensor.items() if tensors[key].requires_grad]
    _check_every_override_decides(overrides, trainable, deciding_overrides)
    return placements, frozen


def _names_of_each_tensor(root: nn.Module) -> tuple[dict[int, list[str]], dict[int, torch.Tensor]]:
    """Every name of each parameter tensor (tied weights have several), by the tensor's id, and the tensors."""
    names_by_tensor: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for raw_name, param in root.named_parameters(remove_duplicate=False):
        name = clean_name(raw_name)
        aliases = names_by_tensor.setdefault(id(param), [])
        if name not in aliases:
            aliases.append(name)
        tensors[id(param)] = param
    return names_by_tensor, tensors


def _check_every_override_decides(
    overrides: Sequence[Override], trainable: list[list[str]], deciding_overrides: set[int]
) -> None:
    """An override that matches nothing, or only what earlier overrides already took, is an error alike."""
    trainable_names = [n for names in trainable for n in names]
    for index, override in enumerate(overrides):
        if not any(fnmatch.fnmatchcase(n, override.pattern) for n in trainable_names):
            sample = ", ".join(trainable_names[:5]) + (", ..." if len(trainable_names) > 5 else "")
            raise ValueError(
                f"override pattern {override.pattern!r} matches no trainable parameter; "
                f"patterns are fnmatch patterns on full dotted names such as {sample}"
            )
        if index not in deciding_overrides:
            _raise_shadowed(index, overrides, trainable)


def _raise_shadowed(index: int, overrides: Sequence[Override], trainable: Sequence[Sequence[str]]) -> None:
    """An override every one of whose parameters an earlier override takes changes nothing: as much a mistake as a
    pattern that matches nothing."""
    override = overrides[index]
    matched = [names for names in trainable if any(fnmatch.fnmatchcase(n, override.pattern) for n in names)]
    earlier = [
        repr(o.pattern)
        for o in overrides[:index]
        if any(fnmatch.fnmatchcase(n, o.pattern) for names in matched for n in names)
    ]
    sample = ", ".join(names[0] for names in matched[:5]) + (", ..." if len(matched) > 5 else "")
    raise ValueError(
        f"override pattern {override.pattern!r} (overrides[{index}]) is shadowed: every trainable parameter it "
        f"matches ({sample}) is taken by an earlier override ({', '.join(dict.fromkeys(earlier))}), so it would "
        "change nothing; remove it, or move it before them"
    )


def numel(tensor: torch.Tensor) -> int:
    """Number of elements of the whole tensor (a DTensor's global size, not its shard)."""
    return math.prod(tensor.shape)


# --- layer ids, for layer-wise learning-rate decay -----------------------------------------------------------------


@dataclass(frozen=True)
class Layers:
    """Every parameter's layer for layer-wise learning-rate decay, numbered as BEiT's fine-tuning code does
    (``get_num_layer_for_vit`` in ``beit/optim_factory.py``) and scaled as timm's ``param_groups_layer_decay``
    (``timm/optim/_param_groups.py``): what comes before the repeated blocks (the embeddings) is layer 0, block ``i``
    is layer ``i + 1``, what comes after the last block (final norm, head) is layer ``L + 1``. A layer's
    learning-rate factor is ``decay ** (L + 1 - layer)``.

    ``stacks`` are the lists of blocks, ``(dotted path, number of blocks)`` in module order (T5's encoder stack, then
    its decoder stack); ``of_name`` maps every parameter name (aliases and frozen ones included) to its layer.

    Examples:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Sequential(*(nn.Sequential(nn.Linear(4, 4)) for _ in "ab")))
        >>> layers = find_layers(model, decay=0.5)
        >>> layers.stacks, layers.blocks, layers.of_name["1.1.0.weight"], layers.factor(0)
        ((('1', 2),), 2, 2, 0.125)
    """

    decay: float
    stacks: tuple[tuple[str, int], ...]
    of_name: Mapping[str, int]

    @property
    def blocks(self) -> int:
        """L, the number of blocks of all stacks together."""
        return sum(count for _, count in self.stacks)

    def factor(self, layer: int) -> float:
        """The learning-rate factor of ``layer``: ``decay ** (L + 1 - layer)``, 1 for the layer after the blocks."""
        return float(self.decay ** (self.blocks + 1 - layer))

    def describe(self) -> str:
        """One line: where the blocks are and how the layers' learning rates follow from them."""
        stacks = ", ".join(f"{path + '.' if path else ''}{{0..{count - 1}}}" for path, count in self.stacks)
        last = self.blocks + 1
        return (
            f"Layer-wise lr decay {self.decay:g}: layer 0 before the blocks, layers 1-{self.blocks} the blocks "
            f"({stacks}), layer {last} after them; lr = base lr * {self.decay:g} ** ({last} - layer)"
        )


def _block_stacks(root: nn.Module) -> list[tuple[str, list[str]]]:
    """The lists of repeated blocks: every ``nn.ModuleList``/``nn.Sequential`` of two or more children of one class,
    each a module of modules (a block, not one Linear) that holds parameters, and not itself inside such a block (a
    Mixtral-style list of experts inside each layer is part of its layer). Returned as (dotted path, block paths), in
    module order."""
    found: list[tuple[str, list[str]]] = []
    for raw_path, module in root.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or isinstance(
            module, parametrize.ParametrizationList
        ):
            continue
        children = list(module.named_children())
        if len(children) < 2 or len({type(child) for _, child in children}) != 1:
            continue
        if not all(next(child.children(), None) is not None for _, child in children):
            continue
        if not all(next(child.parameters(), None) is not None for _, child in children):
            continue
        path = clean_name(raw_path)
        if any(_within(path, outer) for outer, _ in found):
            continue  # named_modules() lists an outer stack before what its blocks hold
        found.append((path, [f"{path}.{name}" if path else name for name, _ in children]))
    return found


def _within(path: str, outer: str) -> bool:
    return outer == "" or path.startswith(outer + ".")


def find_layers(module: nn.Module, *, decay: float) -> Layers:
    """Number every parameter of ``module`` by layer (see ``Layers``), finding the repeated blocks from the module tree:
    GPT-2's ``h.N``, Llama's ``layers.N``, BERT's ``encoder.layer.N``, timm's ``blocks.N``, ... without configuration.

    Several stacks side by side (T5's and BART's encoder and decoder) are numbered one after the other, in module
    order, as the data flows through them: a T5 with 6 + 6 blocks has layers 1-6 in the encoder and 7-12 in the
    decoder. A parameter between two stacks (the encoder's final norm) takes the layer of the block before it, as
    timm's ``group_matcher`` puts a ViT's final norm with its last block. Order is that of ``named_parameters()``.

    Raises ``ValueError`` when the module has no such blocks, saying what was looked for.

    Examples:
        >>> find_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), decay=0.75)
        Traceback (most recent call last):
        ...
        ValueError: layer_decay=0.75 needs the model's repeated blocks, but Sequential has none: ...
    """
    root = unwrap(module)
    stacks = _block_stacks(root)
    if not stacks:
        raise ValueError(
            f"layer_decay={decay:g} needs the model's repeated blocks, but {type(root).__name__} has none: looked for "
            "an nn.ModuleList or nn.Sequential of two or more blocks of one class (such as encoder.layer.N, h.N, "
            "layers.N, blocks.N), each a module of modules holding parameters"
        )
    block_layer = {block: index for index, block in enumerate((b for _, blocks in stacks for b in blocks), start=1)}
    names = [clean_name(name) for name, _ in root.named_parameters(remove_duplicate=False)]
    in_block = [_layer_of_block(name, block_layer) for name in names]
    placed = [index for index, layer in enumerate(in_block) if layer is not None]
    first, last = placed[0], placed[-1]
    of_name: dict[str, int] = {}
    current = 0
    for index, (name, layer) in enumerate(zip(names, in_block)):
        if layer is not None:
            current = layer
        elif index > last:
            current = len(block_layer) + 1
        elif index < first:
            current = 0
        of_name.setdefault(name, current)
    return Layers(decay, tuple((path, len(blocks)) for path, blocks in stacks), of_name)


def _layer_of_block(name: str, block_layer: Mapping[str, int]) -> int | None:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        layer = block_layer.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None
