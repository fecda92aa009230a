"""Shared helpers of the benchmark scripts: devices, synthetic models, interleaved timing, tables.

Methodology (the project's standard for comparing candidates):

- every candidate is timed against its peer in the same run, and the result is a ratio;
- candidates are interleaved round-robin within each repetition (A B C, B C A, C A B, ...), never all of A then all
  of B, so drift in machine load hits every candidate alike; each ratio is taken against the reference's sample of
  the same repetition (a paired ratio) and the median over all repetitions is reported;
- all candidates are rebuilt on fresh allocations several times (``rebuilds``), because two identical optimizers on
  different allocations can differ by several percent; a control candidate identical to the reference ("A vs A")
  shows that noise floor in the table;
- each candidate is warmed up (first steps, state allocation, compilation) before anything is timed.

Nothing here imports lit_decay: the scripts decide what the candidates are.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# ---- devices ---------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda`` as a device; a clear error when CUDA is missing.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for, but torch sees no CUDA device (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"error: unknown --device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock brackets it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_caches(device: torch.device) -> None:
    """Free what Python and the device allocator hold, so the next build gets new allocations."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextmanager
def fresh_allocations(device: torch.device, rng: random.Random) -> Iterator[None]:
    """Build candidates here: caches are emptied first, and a spacer of random size is held while they are built.

    The spacer shifts where the allocator places the new tensors (CUDA's caching allocator would otherwise hand the
    same blocks back, and glibc's mmap often lands on the same addresses), so each rebuild really is a new layout.
    """
    empty_caches(device)
    spacer = torch.empty(rng.randrange(1, 1 << 22), dtype=torch.uint8, device=device)
    try:
        yield
    finally:
        del spacer


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device`` (MemAvailable on CPU; 0 when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


# ---- the machine and the command -------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_lines(device: torch.device) -> list[str]:
    """A few markdown bullet lines naming the machine, so a table is never read without its context."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    lines = [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores ({usable} usable by this process), "
        f"torch threads: {torch.get_num_threads()}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
            f"{torch.cuda.device_count()} visible"
        )
    lines.append(
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
    lines.append(f"- device: {device.type}")
    return lines


def command_line() -> str:
    """The exact command that produced this output, to paste and rerun."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


# ---- sizes -----------------------------------------------------------------------------------------------------------

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def parse_count(text: str) -> int:
    """A parameter count such as ``50M``, ``1.5M``, ``200K`` or ``4096``.

    Example:
        >>> parse_count("50M"), parse_count("1.5m"), parse_count("200K"), parse_count("4096")
        (50000000, 1500000, 200000, 4096)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a count; write e.g. 50M, 1.5M, 200K or 4096")
    value = int(float(match.group(1)) * _SUFFIXES[match.group(2).upper()])
    if value < 1:
        raise ValueError(f"{text!r} must be at least 1")
    return value


def parse_counts(text: str) -> list[int]:
    """A comma-separated list of counts.

    Example:
        >>> parse_counts("1M,10M")
        [1000000, 10000000]
    """
    counts = [parse_count(part) for part in text.split(",") if part.strip()]
    if not counts:
        raise ValueError("expected at least one count, e.g. 1M,10M")
    return counts


def format_count(count: int) -> str:
    """A count as people write it.

    Example:
        >>> format_count(50_331_648), format_count(1_050_000), format_count(9_000)
        ('50.3M', '1.05M', '9.0K')
    """
    if count >= 10**7:
        return f"{count / 1e6:.1f}M"
    if count >= 10**6:
        return f"{count / 1e6:.2f}M"
    if count >= 10**3:
        return f"{count / 1e3:.1f}K"
    return str(count)


# ---- the synthetic model ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """A transformer-shaped block with a cheap forward: LayerNorm, a gated ``qkv``→``proj`` mixer (no attention, so
    the forward stays a few matrix products), LayerNorm, a 4x MLP. Its parameters are what a transformer block has:
    four large matrices, their biases, two norms."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln_1(x)).chunk(3, dim=-1)
        x = x + self.proj(q * torch.sigmoid(k) * v)
        return x + self.out(torch.nn.functional.gelu(self.fc(self.ln_2(x))))


class SyntheticModel(nn.Module):
    """A stack of :class:`Block` of one width, with a final LayerNorm; input and output are ``(batch, width)``."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.width = width
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(self.blocks(x))


def block_numel(width: int) -> int:
    """Parameters of one :class:`Block`: 12·w² matrix entries, 9·w biases, 4·w norm entries.

    Example:
        >>> block_numel(8) == sum(p.numel() for p in Block(8).parameters())
        True
    """
    return 12 * width * width + 13 * width


def model_shape(n_params: int, depth: int | None = None) -> tuple[int, int]:
    """``(width, depth)`` of a :class:`SyntheticModel` with about ``n_params`` parameters (width a multiple of 8).

    Depth defaults to 4 blocks (1 for models under ~50K parameters), so each matrix is large: at 50M the MLP matrices
    have ~4.2M elements, at 1M ~80K, which puts both of lit_decay's kernel paths (eager small tensors, compiled large
    ones) on the table.

    Example:
        >>> width, depth = model_shape(50_000_000); depth, abs(depth * block_numel(width) - 50_000_000) < 1_000_000
        (4, True)
    """
    if depth is None:
        depth = 4 if n_params >= 50_000 else 1
    width = max(8, round(math.sqrt(n_params / (12 * depth)) / 8) * 8)
    return width, depth


def model_numel(n_params: int, depth: int | None = None) -> int:
    """The exact parameter count of the model :func:`build_model` makes for ``n_params``.

    Example:
        >>> model_numel(20_000) == numel(SyntheticModel(*model_shape(20_000)))
        True
    """
    width, depth = model_shape(n_params, depth)
    return depth * block_numel(width) + 2 * width


def build_model(n_params: int, device: torch.device, *, seed: int, depth: int | None = None) -> SyntheticModel:
    """A :class:`SyntheticModel` of about ``n_params`` fp32 parameters on ``device``, initialised from ``seed``.

    Built on the meta device and filled in place on ``device``: no throw-away CPU initialisation of a large model.
    Weights ~ N(0, 0.02), biases small, norms at (1, 0): values a trained model plausibly has.
    """
    width, depth = model_shape(n_params, depth)
    with torch.device("meta"):
        model = SyntheticModel(width, depth)
    model.to_empty(device=device)
    _init_like_trained(model, seed, lambda name: ".ln" in name or name.startswith("ln"))
    return model


def _init_like_trained(model: nn.Module, seed: int, is_norm: Callable[[str], bool]) -> None:
    """Weights ~ N(0, 0.02), biases ~ N(0, 0.002), norm gains 1 and norm biases 0."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_norm(name):
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.002, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)


def fill_gradients(model: nn.Module, *, seed: int) -> None:
    """Give every parameter a random gradient once, so an optimizer step can be timed on its own."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.grad = torch.empty_like(param).normal_(0.0, 1e-3, generator=generator)


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- many tensors: named shape sets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSet:
    """A named list of ``(dotted name, shape)`` parameters: the "many tensors" case of the benchmarks.

    Per-tensor costs (a kernel launch, a Python call per tensor in a step hook) hide behind four large matrices and
    show with many small ones, so the same tables are also measured on these lists. The names follow the model they
    come from, so lit_decay's grouping rules put matrices in ``decay`` and biases and norms (1-D) in ``no_decay``.
    """

    name: str
    label: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    @property
    def largest(self) -> int:
        """Elements of the largest tensor (which of lit_decay's kernel paths, eager or compiled, it takes)."""
        return max(math.prod(shape) for _, shape in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)


def _matrix(elements: int) -> tuple[int, int]:
    """A 2-D shape of ``elements`` entries, as square as its divisors allow (64x64 for 4,096; 256x512 for 131,072).

    Example:
        >>> _matrix(4096), _matrix(131072), _matrix(7)
        ((64, 64), (256, 512), (1, 7))
    """
    rows = max(d for d in range(1, math.isqrt(elements) + 1) if elements % d == 0)
    return rows, elements // rows


def uniform_shape_set(count: int, elements: int) -> ShapeSet:
    """``count`` weight matrices of ``elements`` entries each, named ``layers.{i}.weight`` (all decayed).

    Example:
        >>> s = uniform_shape_set(200, 4096); (s.label, s.tensors, s.numel, s.shapes[0])
        ('200×4,096', 200, 819200, ('layers.0.weight', (64, 64)))
    """
    shape = _matrix(elements)
    return ShapeSet(
        f"{count}x{elements}", f"{count}×{elements:,}", tuple((f"layers.{i}.weight", shape) for i in range(count))
    )


def gpt2_small_shapes() -> ShapeSet:
    """GPT-2 small's own parameter shapes and names (Radford et al., 2019; the Hugging Face ``GPT2Model`` layout,
    whose ``Conv1D`` weights are stored input × output): 148 tensors, 124,439,808 parameters.

    Example:
        >>> s = gpt2_small_shapes(); (s.tensors, s.numel)
        (148, 124439808)
    """
    d, vocab, context, layers = 768, 50257, 1024, 12
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (vocab, d)), ("wpe.weight", (context, d))]
    for i in range(layers):
        h = f"h.{i}"
        shapes += [
            (f"{h}.ln_1.weight", (d,)),
            (f"{h}.ln_1.bias", (d,)),
            (f"{h}.attn.c_attn.weight", (d, 3 * d)),
            (f"{h}.attn.c_attn.bias", (3 * d,)),
            (f"{h}.attn.c_proj.weight", (d, d)),
            (f"{h}.attn.c_proj.bias", (d,)),
            (f"{h}.ln_2.weight", (d,)),
            (f"{h}.ln_2.bias", (d,)),
            (f"{h}.mlp.c_fc.weight", (d, 4 * d)),
            (f"{h}.mlp.c_fc.bias", (4 * d,)),
            (f"{h}.mlp.c_proj.weight", (4 * d, d)),
            (f"{h}.mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return ShapeSet("gpt2-small", "gpt2-small", tuple(shapes))


def llama_1b_shapes() -> ShapeSet:
    """A Llama-like model of about a billion parameters (Touvron et al., 2023, architecture; TinyLlama's widths):
    16 layers of hidden size 2048 with q/k/v/o projections, a SwiGLU MLP of 5632, two RMSNorm scales per layer, a
    final norm, and untied input and output embeddings over a 50,304-token vocabulary: 147 tensors, ~1.03B.

    Example:
        >>> s = llama_1b_shapes(); (s.tensors, round(s.numel / 1e9, 2))
        (147, 1.03)
    """
    d, ff, vocab, layers = 2048, 5632, 50304, 16
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        layer = f"layers.{i}"
        shapes += [
            (f"{layer}.input_layernorm.weight", (d,)),
            *((f"{layer}.self_attn.{proj}.weight", (d, d)) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")),
            (f"{layer}.post_attention_layernorm.weight", (d,)),
            (f"{layer}.mlp.gate_proj.weight", (ff, d)),
            (f"{layer}.mlp.up_proj.weight", (ff, d)),
            (f"{layer}.mlp.down_proj.weight", (d, ff)),
        ]
    shapes += [("norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    return ShapeSet("1b", "1b (Llama-like)", tuple(shapes))


#: The named shape sets of ``--shapes`` besides ``NxM`` (N matrices of M elements).
NAMED_SHAPE_SETS: dict[str, Callable[[], ShapeSet]] = {"gpt2-small": gpt2_small_shapes, "1b": llama_1b_shapes}


def parse_shape_set(text: str) -> ShapeSet:
    """``NxM`` (``N`` matrices of ``M`` elements, e.g. ``200x4096``) or a named set (``gpt2-small``, ``1b``).

    Example:
        >>> parse_shape_set("100x131072").label, parse_shape_set("gpt2-small").numel
        ('100×131,072', 124439808)
    """
    name = text.strip().lower()
    if name in NAMED_SHAPE_SETS:
        return NAMED_SHAPE_SETS[name]()
    match = re.fullmatch(r"(\d+)x(\d+)", name)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f"{text!r} is not a shape set; write NxM (e.g. 200x4096) or one of {sorted(NAMED_SHAPE_SETS)}")
    return uniform_shape_set(int(match.group(1)), int(match.group(2)))


def parse_shape_sets(text: str) -> list[ShapeSet]:
    """A comma-separated list of shape sets; ``none`` or nothing for none.

    Example:
        >>> [s.name for s in parse_shape_sets("200x4096, gpt2-small")], parse_shape_sets("none")
        (['200x4096', 'gpt2-small'], [])
    """
    if text.strip().lower() in ("", "none"):
        return []
    return [parse_shape_set(part) for part in text.split(",") if part.strip()]


class ShapeModel(nn.Module):
    """Parameters of a :class:`ShapeSet` under their dotted names, in plain container modules (no forward: the
    benchmarks time optimizer steps and logging steps on it, with gradients from :func:`fill_gradients`)."""

    def __init__(self, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        super().__init__()
        for name, shape in shapes:
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for part in path:
                child = owner._modules.get(part)
                if child is None:
                    child = nn.Module()
                    owner.add_module(part, child)
                owner = child
            owner.register_parameter(leaf, nn.Parameter(torch.empty(shape)))


def build_shape_model(shape_set: ShapeSet, device: torch.device, *, seed: int) -> ShapeModel:
    """A :class:`ShapeModel` of fp32 parameters on ``device``, initialised from ``seed`` as :func:`build_model` does
    (built on the meta device first: no throw-away CPU copy of a billion parameters)."""
    with torch.device("meta"):
        model = ShapeModel(shape_set.shapes)
    model.to_empty(device=device)
    _init_like_trained(model, seed, _owned_by_a_norm)
    return model


def _owned_by_a_norm(name: str) -> bool:
    owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
    return "ln" in owner or "norm" in owner


@dataclass(frozen=True)
class Workload:
    """One row block of a table: a model to build, what the params column says, and the key of its targets (the
    requested size for the synthetic model, the shape set's name for many tensors)."""

    label: str
    count: int
    tensors: int
    largest: int
    build: Callable[[torch.device, int], nn.Module]
    # The size asked for (the synthetic model) or None (a shape set).
    size: int | None = None
    shape_set: str | None = None
    describe: str = ""

    @classmethod
    def of_size(cls, n_params: int) -> Workload:
        width, depth = model_shape(n_params)
        model = SyntheticModel.__name__
        return cls(
            label=format_count(model_numel(n_params)),
            count=model_numel(n_params),
            tensors=depth * 12 + 2,
            largest=4 * width * width,
            build=lambda device, seed: build_model(n_params, device, seed=seed),
            size=n_params,
            describe=f"{format_count(model_numel(n_params))} parameters ({model}, width {width}, depth {depth})",
        )

    @classmethod
    def of_shapes(cls, shape_set: ShapeSet) -> Workload:
        return cls(
            label=shape_set.label,
            count=shape_set.numel,
            tensors=shape_set.tensors,
            largest=shape_set.largest,
            build=lambda device, seed: build_shape_model(shape_set, device, seed=seed),
            shape_set=shape_set.name,
            describe=f"{shape_set.label}: {shape_set.tensors} tensors, {format_count(shape_set.numel)} parameters",
        )


# ---- timing ----------------------------------------------------------------------------------------------------------


class Clock:
    """Times a block of work on ``device``: CUDA events bracketed by synchronisations on a GPU, a host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def seconds(self, work: Callable[[], object], repeat: int = 1) -> float:
        """Seconds per call of ``work``, over ``repeat`` back-to-back calls."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            for _ in range(repeat):
                work()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / repeat
        begin = time.perf_counter()
        for _ in range(repeat):
            work()
        return (time.perf_counter() - begin) / repeat


@dataclass
class Candidate:
    """One thing to time: ``run`` does one unit of work (an optimizer step, a training step, a logging step)."""

    name: str
    run: Callable[[], object]
    # What the work is, for the table ("fused", "foreach", ...).
    note: str = ""


@dataclass
class Samples:
    """Seconds per unit of work for each candidate, in (rebuild, repetition) order, plus warm-up figures."""

    reference: str
    order: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    # name -> rebuild -> repetition -> seconds
    times: dict[str, list[list[float]]] = field(default_factory=dict)
    # name -> seconds of the very first call in the first build (state allocation, compilation)
    first_call: dict[str, float] = field(default_factory=dict)
    # the number of calls per sample chosen for each rebuild
    repeat: list[int] = field(default_factory=list)

    def add_rebuild(self) -> None:
        for name in self.order:
            self.times.setdefault(name, []).append([])


def build_rotated(builders: Sequence[Callable[[], Candidate]], rebuild: int) -> list[Candidate]:
    """Call the ``builders`` starting one place further along for each ``rebuild`` (so no candidate always gets the
    first, or the last, allocations), and return the candidates in the builders' order.

    Example:
        >>> made = []
        >>> def maker(name):
        ...     return lambda: made.append(name) or Candidate(name, lambda: None)
        >>> [c.name for c in build_rotated([maker("A"), maker("B"), maker("C")], 1)], made
        (['A', 'B', 'C'], ['B', 'C', 'A'])
    """
    count = len(builders)
    built: dict[int, Candidate] = {}
    for offset in range(count):
        index = (offset + rebuild) % count
        built[index] = builders[index]()
    return [built[index] for index in range(count)]


def _calls_per_sample(clock: Clock, candidates: Sequence[Candidate], min_sample_s: float) -> int:
    """Calls per sample, so that the fastest candidate's sample lasts at least ``min_sample_s`` (timer resolution
    and per-call jitter matter little for slow candidates, much for a 1 ms step)."""
    fastest = min(clock.seconds(c.run) for c in candidates)
    return max(1, min(1000, math.ceil(min_sample_s / max(fastest, 1e-6))))


def interleaved(
    build: Callable[[int], Sequence[Candidate]],
    *,
    device: torch.device,
    reference: str,
    rebuilds: int,
    repetitions: int,
    warmup: int,
    min_sample_s: float = 0.02,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Samples:
    """Time every candidate ``build(rebuild)`` returns, round-robin, over fresh builds.

    For each of ``rebuilds`` builds: the candidates are built on fresh allocations, each is warmed up with ``warmup``
    calls (the first call of the first build is timed on its own and kept as ``first_call``), then each repetition
    times every candidate once, starting one place further along the list each time. The build is dropped before the
    next one is made.
    """
    clock = Clock(device)
    rng = random.Random(seed)
    samples: Samples | None = None
    for rebuild in range(rebuilds):
        with fresh_allocations(device, rng):
            candidates = list(build(rebuild))
        names = [c.name for c in candidates]
        if reference not in names:
            raise ValueError(f"reference {reference!r} is not among the candidates {names}")
        if samples is None:
            samples = Samples(reference=reference, order=names, notes={c.name: c.note for c in candidates})
        elif names != samples.order:
            raise ValueError("every build must return the same candidates in the same order")
        samples.add_rebuild()
        for candidate in candidates:
            if rebuild == 0:
                samples.first_call[candidate.name] = clock.seconds(candidate.run)
            for _ in range(warmup):
                candidate.run()
        synchronize(device)
        repeat = _calls_per_sample(clock, candidates, min_sample_s)
        samples.repeat.append(repeat)
        for repetition in range(repetitions):
            shift = (repetition + rebuild) % len(candidates)
            for candidate in candidates[shift:] + candidates[:shift]:
                samples.times[candidate.name][rebuild].append(clock.seconds(candidate.run, repeat))
        if progress is not None:
            progress(f"rebuild {rebuild + 1}/{rebuilds} done ({repeat} call(s) per sample)")
        del candidates
        empty_caches(device)
    assert samples is not None
    return samples


@dataclass(frozen=True)
class Summary:
    """What the table shows for one candidate."""

    name: str
    note: str
    median_ms: float
    min_ms: float
    ratio: float
    ratio_low: float
    ratio_high: float
    first_ms: float


def summarise(samples: Samples) -> list[Summary]:
    """Per candidate: median and min time over all samples, and the ratio to the reference.

    ``ratio`` is the median, over every (rebuild, repetition), of the candidate's time divided by the reference's
    time in the same repetition; ``ratio_low``/``ratio_high`` are the smallest and largest per-rebuild medians of
    that ratio, i.e. how much a different allocation moves the answer.

    Example:
        >>> s = Samples(reference="A", order=["A", "B"], times={"A": [[1.0, 2.0]], "B": [[1.5, 3.0]]})
        >>> [(x.name, x.ratio, x.median_ms) for x in summarise(s)]
        [('A', 1.0, 1500.0), ('B', 1.5, 2250.0)]
    """
    reference = samples.times[samples.reference]
    summaries = []
    for name in samples.order:
        per_rebuild = samples.times[name]
        flat = [t for rebuild in per_rebuild for t in rebuild]
        paired = [
            [t / r for t, r in zip(mine, theirs) if r > 0] for mine, theirs in zip(per_rebuild, reference, strict=True)
        ]
        all_ratios = [q for rebuild in paired for q in rebuild]
        rebuild_medians = [statistics.median(q) for q in paired if q]
        summaries.append(
            Summary(
                name=name,
                note=samples.notes.get(name, ""),
                median_ms=statistics.median(flat) * 1e3,
                min_ms=min(flat) * 1e3,
                ratio=statistics.median(all_ratios) if all_ratios else math.nan,
                ratio_low=min(rebuild_medians) if rebuild_medians else math.nan,
                ratio_high=max(rebuild_medians) if rebuild_medians else math.nan,
                first_ms=samples.first_call.get(name, math.nan) * 1e3,
            )
        )
    return summaries


# ---- output ----------------------------------------------------------------------------------------------------------


def ms(value: float) -> str:
    """Milliseconds with sensible precision.

    Example:
        >>> ms(0.01234), ms(1.234), ms(123.4), ms(12345.6)
        ('0.0123', '1.23', '123.4', '12346')
    """
    if math.isnan(value):
        return "—"
    if value < 100:
        return f"{value:.3g}"
    if value < 10_000:
        return f"{value:.1f}"
    return f"{value:.0f}"


def ratio(value: float) -> str:
    """A ratio as ``1.03×``."""
    return "—" if math.isnan(value) else f"{value:.2f}×"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table.

    Example:
        >>> print(markdown_table(["a", "b"], [["1", "2"]]))
        | a | b |
        | --- | --- |
        | 1 | 2 |
    """
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} headers")
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def parse_markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``text`` as a list of rows keyed by header (what the tests read back).

    Example:
        >>> parse_markdown_tables("x\\n| a | b |\\n| --- | --- |\\n| 1 | 2 \\\\| 3 |\\n")
        [[{'a': '1', 'b': '2 | 3'}]]
    """

    def cells(line: str) -> list[str]:
        inner = line.strip()[1:-1]
        return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]

    tables: list[list[dict[str, str]]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        if line.startswith("|") and index + 1 < len(lines) and re.fullmatch(r"\|( *-+ *\|)+", lines[index + 1].strip()):
            headers = cells(line)
            rows = []
            index += 2
            while index < len(lines) and lines[index].strip().startswith("|"):
                rows.append(dict(zip(headers, cells(lines[index]))))
                index += 1
            tables.append(rows)
        else:
            index += 1
    return tables


class Report:
    """Collects the markdown of a run; printed as it grows (so a long run shows progress) and written at the end."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        print(text + "\n", flush=True)

    def text(self) -> str:
        return "\n\n".join(self.parts) + "\n"

    def write(self, path: str | None) -> None:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(self.text())
            print(f"(written to {path})", flush=True)


def header(title: str, device: torch.device, settings: Mapping[str, object]) -> str:
    """The title, the machine, the exact command and the settings, as markdown."""
    setting_text = ", ".join(f"{key}={value}" for key, value in settings.items())
    return "\n".join(
        [
            f"## {title}",
            "",
            *machine_lines(device),
            "",
            "Command:",
            "",
            "```",
            command_line(),
            "```",
            "",
            f"Settings: {setting_text}; LIT_DECAY_COMPILE={os.environ.get('LIT_DECAY_COMPILE', 'auto (default)')}.",
        ]
    )


def quiet_libraries() -> None:
    """Keep Lightning's and lit_decay's INFO lines (grouping summaries, "GPU available") out of the output."""
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def set_threads(threads: int | None) -> None:
    """Use ``threads`` intra-op threads when given (a loaded machine times more steadily with fewer)."""
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"error: --threads must be at least 1; got {threads}")
        torch.set_num_threads(threads)


# ---- the command line both scripts share -----------------------------------------------------------------------------

#: Defaults of the timing options, and the smaller ones of ``--smoke`` (for the tests).
TIMING_DEFAULTS: dict[str, Any] = {"rebuilds": 3, "repetitions": 15, "warmup": 3, "min_sample_ms": 20.0}
SMOKE_TIMING: dict[str, Any] = {"rebuilds": 1, "repetitions": 2, "warmup": 1, "min_sample_ms": 1.0}


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both benchmarks take: device, how to time, memory sharing, threads, seed, output, smoke mode."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--rebuilds", type=int, default=None, help="fresh builds of all candidates (default 3)")
    parser.add_argument("--repetitions", type=int, default=None, help="timed rounds per build (default 15)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per candidate per build (default 3)")
    parser.add_argument(
        "--min-sample-ms", type=float, default=None, help="a sample repeats the work until it lasts this (default 20)"
    )
    parser.add_argument(
        "--share-params",
        default="auto",
        choices=("auto", "yes", "no"),
        help="let the candidates share one set of weights and gradients (each optimizer keeps its own state);\n"
        "auto: only when separate models would not fit in memory",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the markdown here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 rebuild, few repetitions (tests)")


def fill_defaults(args: argparse.Namespace, defaults: Mapping[str, Any], smoke: Mapping[str, Any]) -> None:
    """Set every option left at None: the timing defaults and ``defaults``, or their ``--smoke`` forms."""
    chosen = {**TIMING_DEFAULTS, **defaults}
    if args.smoke:
        chosen.update(SMOKE_TIMING, **smoke)
        if args.threads is None:
            args.threads = 1
    for key, value in chosen.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def time_candidates(
    args: argparse.Namespace, build: Callable[[int], Sequence[Candidate]], device: torch.device, reference: str
) -> Samples:
    """``interleaved`` with the timing options of the command line."""
    return interleaved(
        build,
        device=device,
        reference=reference,
        rebuilds=args.rebuilds,
        repetitions=args.repetitions,
        warmup=args.warmup,
        min_sample_s=args.min_sample_ms / 1e3,
        seed=args.seed,
        progress=progress,
    )


def summary_cells(summary: Summary) -> list[str]:
    """A summary's common table cells: name, work, median and min ms, ratio, its range over rebuilds, first call."""
    return [
        summary.name,
        summary.note,
        ms(summary.median_ms),
        ms(summary.min_ms),
        ratio(summary.ratio),
        f"{ratio(summary.ratio_low)}–{ratio(summary.ratio_high)}",
        ms(summary.first_ms),
    ]


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries only the markdown)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
