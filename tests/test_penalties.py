"""lit_decay.penalties: the L1 gradient term, the soft-threshold, and the hooks that apply them around Adam's step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lit_decay
from lit_decay.penalties import add_l1_gradient, attach, is_attached, soft_threshold


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: OpenMP workers only spin against other processes on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------------------
# add_l1_gradient
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "0-d tensor"])
def test_add_l1_gradient_by_hand(dtype: torch.dtype, as_tensor: bool) -> None:
    p1 = torch.tensor([2.0, -1.0, 0.0, -0.0, 3e-30, -5.0], dtype=dtype)
    g1 = torch.tensor([0.5, 0.5, 0.5, -0.25, 0.0, 1.0], dtype=dtype)
    p2 = torch.tensor([[-3.0, 0.0], [4.0, -1e-3]], dtype=dtype)
    g2 = torch.zeros(2, 2, dtype=dtype)
    coefficient = torch.tensor(0.25, dtype=dtype) if as_tensor else 0.25
    before = (p1.clone(), p2.clone())

    add_l1_gradient([p1, p2], [g1, g2], coefficient)

    # sign(0) = 0: zero weights (of either sign) get no term; tiny weights get the full term.
    expected_g1 = torch.tensor([0.75, 0.25, 0.5, -0.25, 0.25, 0.75], dtype=dtype)
    expected_g2 = torch.tensor([[-0.25, 0.0], [0.25, -0.25]], dtype=dtype)
    assert torch.equal(g1, expected_g1) and g1.dtype == dtype
    assert torch.equal(g2, expected_g2)
    assert torch.equal(p1, before[0]) and torch.equal(p2, before[1])  # the weights are read, never written


def test_add_l1_gradient_float_and_tensor_coefficient_agree() -> None:
    params = [torch.randn(7, 5), torch.randn(3)]
    grads = [torch.randn(7, 5), torch.randn(3)]
    by_float = [g.clone() for g in grads]
    by_tensor = [g.clone() for g in grads]
    add_l1_gradient(params, by_float, 0.1)
    add_l1_gradient(params, by_tensor, torch.tensor(0.1))
    for a, b, g, p in zip(by_float, by_tensor, grads, params):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, g + 0.1 * torch.sign(p))


def test_add_l1_gradient_with_a_scale_tensor() -> None:
    # The GradScaler form: a 0-d scale times the coefficient, applied to already scaled gradients.
    p = torch.tensor([1.0, -2.0, 0.0])
    g = torch.tensor([1024.0, 2048.0, -512.0])
    add_l1_gradient([p], [g], torch.tensor(1024.0) * 0.5)
    assert torch.equal(g, torch.tensor([1536.0, 1536.0, -512.0]))


# --------------------------------------------------------------------------------------------------------------------
# soft_threshold
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "0-d tensor"])
def test_soft_threshold_by_hand(dtype: torch.dtype, as_tensor: bool) -> None:
    p = torch.tensor([0.5, -0.05, 0.02, -2.0, 0.0, 0.125, -0.125, 0.1250001, 3.0], dtype=dtype)
    threshold = torch.tensor(0.125, dtype=dtype) if as_tensor else 0.125
    soft_threshold([p], threshold)
    expected = torch.tensor([0.375, 0.0, 0.0, -1.875, 0.0, 0.0, 0.0, 0.0000001, 2.875], dtype=dtype)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-7 if dtype == torch.float32 else 1e-15)
    # |p| <= threshold gives exact zeros, everything else keeps its sign.
    assert torch.equal(p == 0, expected == 0)
    assert torch.equal(torch.sign(p), torch.sign(expected))
    assert p.dtype == dtype


def test_soft_threshold_zero_threshold_and_non_contiguous() -> None:
    p = torch.randn(4, 6)
    before = p.clone()
    soft_threshold([p], 0.0)
    assert torch.equal(p, before)
    soft_threshold([p], torch.tensor(0.0))
    assert torch.equal(p, before)

    # A transposed (non-contiguous) view is shrunk in place, in its own layout.
    view = p.t()
    assert not view.is_contiguous()
    soft_threshold([view], torch.tensor(0.5))
    expected = torch.sign(before) * torch.clamp(before.abs() - 0.5, min=0.0)
    torch.testing.assert_close(p, expected)
    assert torch.equal(p == 0, expected == 0)

    q = torch.randn(4, 6)
    q_before = q.clone()
    soft_threshold([q.t()], 0.5)
    torch.testing.assert_close(q, torch.sign(q_before) * torch.clamp(q_before.abs() - 0.5, min=0.0))


def test_soft_threshold_float_and_tensor_agree() -> None:
    a = torch.randn(1000, dtype=torch.float64)
    b = a.clone()
    soft_threshold([a], 0.3)
    soft_threshold([b], torch.tensor(0.3, dtype=torch.float64))
    assert torch.equal(a, b)
    assert int((a == 0).sum()) > 100


# --------------------------------------------------------------------------------------------------------------------
# Multi-tensor ops: a constant number of calls per batch of tensors, whatever the number of tensors
# --------------------------------------------------------------------------------------------------------------------


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if "view" not in str(func):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("count", [10, 200])
def test_many_small_tensors_take_a_constant_number_of_calls(count: int) -> None:
    """No loop over tensors: 200 tensors cost the same number of torch calls as 10 (one batch of foreach ops)."""
    params = [torch.randn(64) for _ in range(count)]
    grads = [torch.randn(64) for _ in range(count)]
    expected_grads = [g + 0.1 * torch.sign(p) for p, g in zip(params, grads)]
    expected_params = [torch.sign(p) * torch.clamp(p.abs() - 0.5, min=0.0) for p in params]
    with _CountOps() as l1_calls:
        add_l1_gradient(params, grads, 0.1)
    with _CountOps() as proximal_calls:
        soft_threshold(params, 0.5)
    with _CountOps() as masked_calls:
        soft_threshold([p.clone() for p in params[:2]], torch.tensor(0.0))
    assert [op.split(".")[1] for op in l1_calls.ops] == ["_foreach_sign", "_foreach_add_"]
    assert len(proximal_calls.ops) == 3, proximal_calls.ops
    assert len(masked_calls.ops) <= 8, masked_calls.ops
    for got, want in zip(grads + params, expected_grads + expected_params):
        torch.testing.assert_close(got, want)


def test_batches_cut_large_tensors_and_mix_dtypes_and_devices_of_a_group() -> None:
    """Tensors larger than a batch are cut into views (the work is done in place on the real tensor); float32 and
    float64 tensors of one call go to separate foreach calls; the large-tensor softshrink path and the foreach path
    give the same numbers."""
    big = torch.randn(2 * (1 << 20) + 17, dtype=torch.float64)
    big[::9] = 0.0
    small = torch.randn(100, dtype=torch.float32)
    medium = torch.randn(1 << 16, dtype=torch.float32)
    params = [big, small, medium]
    grads = [torch.randn_like(p) for p in params]
    expected_grads = [g + 0.02 * torch.sign(p) for p, g in zip(params, grads)]
    add_l1_gradient(params, grads, torch.tensor(0.02, dtype=torch.float64))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    copies = [p.clone() for p in params]
    expected = [torch.sign(p) * torch.clamp(p.abs() - 0.3, min=0.0) for p in params]
    soft_threshold(params, 0.3)  # large tensors: softshrink, small ones: foreach
    soft_threshold(copies, torch.tensor(0.3, dtype=torch.float64))  # all foreach, tensor threshold
    for got, other, want in zip(params, copies, expected):
        torch.testing.assert_close(got, want)
        assert torch.equal(got, other)
        assert torch.equal(got == 0, want == 0)


def test_batches_keep_small_tensors_together_and_cut_large_ones() -> None:
    """Small tensors share batches up to the batch size; a larger tensor is a batch of its own, cut into views of the
    piece size that cover it exactly."""
    from lit_decay._batches import batches

    small = [torch.zeros(3) for _ in range(5)]
    big = torch.arange(10.0)
    found = list(batches([[*small[:2], big, *small[2:]]], limit=6, piece=4))
    assert [batch.owner for batch in found] == [[0, 1], [2], [2], [2], [3, 4], [5]]
    pieces = [p for batch in found if batch.owner == [2] for p in batch.lists[0]]
    assert [p.numel() for p in pieces] == [4, 4, 2]
    assert torch.equal(torch.cat(pieces), big) and all(p.data_ptr() >= big.data_ptr() for p in pieces)


def test_l1_term_on_cut_tensors_nan_and_layouts() -> None:
    """add_l1_gradient on a tensor cut into several batches and on a strided one gives g + c·sign(p) with
    torch.sign's conventions (0 for ±0 and NaN), with a float or a tensor coefficient."""
    n = 2 * (1 << 20) + 5  # cut into three pieces
    p = torch.randn(n, dtype=torch.float64)
    p[::5] = 0.0
    p[3] = float("nan")
    strided = torch.randn(40, 30, dtype=torch.float64).t()  # not contiguous
    for coefficient in (0.03, torch.tensor(0.03)):
        grads = [torch.randn(n, dtype=torch.float64), torch.randn(30, 40, dtype=torch.float64)]
        expected = [g + 0.03 * torch.sign(q) for g, q in zip(grads, (p, strided))]
        add_l1_gradient([p, strided], grads, coefficient)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, equal_nan=True)
        assert torch.equal(grads[0][::5], expected[0][::5])  # zero weights: no term


# --------------------------------------------------------------------------------------------------------------------
# Runs of same-shaped tensors: one compiled pass each on a CPU
# --------------------------------------------------------------------------------------------------------------------


def test_same_shape_runs_group_by_shape_dtype_and_device() -> None:
    """Runs hold tensors of one shape, dtype and device, in the allowed lengths; small, non-contiguous and lone
    tensors are left over, except a large lone one, which is a run of its own."""
    from lit_decay._batches import same_shape_runs

    tensors = (
        [torch.zeros(8, 8) for _ in range(6)]  # a run of 4, then 2 left
        + [torch.zeros(8, 8, dtype=torch.float64) for _ in range(4)]  # same shape, other dtype: its own run
        + [torch.zeros(2, 32) for _ in range(4)]  # same numel, other shape: its own run
        + [torch.zeros(8, 8).t() for _ in range(4)]  # not contiguous
        + [torch.zeros(3) for _ in range(4)]  # too small
        + [torch.zeros(300)]  # alone but large
    )
    runs, rest = same_shape_runs(tensors, min_numel=16, single_numel=256, lengths=(4,))
    assert runs == [[0, 1, 2, 3], [6, 7, 8, 9], [10, 11, 12, 13], [22]]
    assert rest == [4, 5, *range(14, 22)]


def test_plan_is_kept_for_the_same_tensors_only() -> None:
    """A step finds its group's plan by the tensors' ids (weakly held, so only the very same tensors match); another
    list, or sharded/complex tensors (viewed anew at every call), get a plan of their own."""
    from lit_decay._batches import plan

    weights = [torch.zeros(64, 64) for _ in range(6)]
    first = plan(weights, min_numel=1 << 12)
    assert plan(list(weights), min_numel=1 << 12) is first
    assert [bucket.runs for bucket in first.buckets] == [[[0, 1, 2, 3]]]
    other = plan([*weights[:5], torch.zeros(64, 64)], min_numel=1 << 12)
    assert other is not first
    assert plan(weights, min_numel=None).buckets[0].runs == []  # compiling off: everything to the foreach ops
    import lit_decay._batches

    def kept_for(tensor_id: int) -> int:
        return sum(tensor_id in key for key in lit_decay._batches._PLANS)

    assert kept_for(id(weights[-1])) == 2  # the plans with and without runs
    gone = id(weights.pop())  # freed: the plans of lists holding it go with it (its id may now be reused)
    assert kept_for(gone) == 0
    complex_weights = [torch.zeros(64, 32, dtype=torch.complex64) for _ in range(4)]
    made = plan(complex_weights, min_numel=1 << 12)
    assert not made.plain and made.buckets[0].runs == [[0, 1, 2, 3]]  # real views of (64, 32, 2)
    assert plan(complex_weights, min_numel=1 << 12) is not made


def _compiled(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    import lit_decay._compile

    monkeypatch.setenv("LIT_DECAY_COMPILE", setting)
    monkeypatch.setattr(lit_decay._compile, "_failed", set())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_runs_equal_the_multi_tensor_ops_and_the_reference(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of same-shaped tensors (compiled) and the multi-tensor ops (LIT_DECAY_COMPILE=0) give the same bits, for
    the L1 term with a number or a GradScaler-style float64 tensor coefficient and for the soft threshold, and both
    equal a float64 reference written from the update rule (zeros and NaN weights included)."""
    import lit_decay._compile
    import lit_decay.penalties

    calls: list[tuple[str, int]] = []
    for name in ("_compiled_add_signs", "_compiled_shrink"):
        real = getattr(lit_decay.penalties, name)
        spy = lambda *args, name=name, real=real: calls.append((name, len(args[0]))) or real(*args)  # noqa: E731
        monkeypatch.setattr(lit_decay.penalties, name, spy)
    shapes = [(64, 64)] * 21 + [(64, 64)] + [(4096,)] * 4 + [(10,)] * 3
    params = [torch.randn(shape, dtype=dtype) * 0.05 for shape in shapes]
    params[0][::7] = 0.0
    params[1][3, 3] = float("nan")
    grads = [torch.randn_like(p) for p in params]
    scale = torch.tensor(3.0, dtype=torch.float32)
    for coefficient in (0.02, scale.double() * 0.02):
        results = {}
        for setting in ("0", "auto"):
            _compiled(monkeypatch, setting)
            ps, gs = [p.clone() for p in params], [g.clone() for g in grads]
            add_l1_gradient(ps, gs, coefficient)
            soft_threshold(ps, 0.03)
            results[setting] = (ps, gs)
            assert not lit_decay._compile._failed
            # 22 of (64, 64): runs of 16 and 4, 2 left over; 4 of (4096,): a run of 4; the tiny ones left over
            expected = (
                []
                if setting == "0"
                else [(name, n) for name in ("_compiled_add_signs", "_compiled_shrink") for n in (16, 4, 4)]
            )
            assert sorted(calls) == sorted(expected), calls
            calls.clear()
        c = float(coefficient)
        for got_p, got_g, p, g in zip(*results["auto"], params, grads):
            want_g = g.double() + c * torch.sign(p.double())
            shrunk = p.double() - torch.clamp(p.double(), -0.03, 0.03)
            torch.testing.assert_close(got_g.double(), want_g, equal_nan=True)
            torch.testing.assert_close(got_p.double(), shrunk, equal_nan=True)
            assert torch.equal(got_p == 0, shrunk.to(dtype) == 0)  # exact zeros where |p| ≤ threshold
        for got, eager in zip(results["auto"][0] + results["auto"][1], results["0"][0] + results["0"][1]):
            assert torch.equal(got.nan_to_num(7.0), eager.nan_to_num(7.0))


@pytest.mark.parametrize("mode", ["l1", "decoupled_l1"])
def test_changing_set_of_stepped_tensors_compiles_the_l1_modes_a_bounded_number_of_times(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which tensors have a gradient changes from step to step (a branch used only sometimes, tensors sitting out):
    the runs change with it, but their lengths come from a fixed set, so after the first steps nothing compiles
    again, and every step still equals the reference."""
    import torch._dynamo.utils

    import lit_decay._compile

    _compiled(monkeypatch, "auto")
    trunk = nn.ParameterList([nn.Parameter(torch.randn(64, 64) * 0.05) for _ in range(24)])
    branch = nn.ParameterList([nn.Parameter(torch.randn(128, 64) * 0.05) for _ in range(5)])
    model = nn.ModuleDict({"trunk": trunk, "branch": branch})
    optimizer = lit_decay.configure_adam(model, lr=0.01, weight_decay=0.05, mode=mode)
    graphs = []
    for step in range(9):
        optimizer.zero_grad(set_to_none=True)
        used = list(trunk) + (list(branch) if step % 3 == 0 else [])
        for index, p in enumerate(used):
            if index % 7 != step % 7:
                p.grad = torch.randn_like(p)
        before = {p: p.detach().clone() for p in model.parameters() if p.grad is not None}
        grads = {p: p.grad.clone() for p in before}
        optimizer.step()
        if mode == "l1":
            for p, g in grads.items():  # the hook added the term in place before Adam read the gradient
                torch.testing.assert_close(p.grad, g + 0.05 * torch.sign(before[p]))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[3:] == [graphs[3]] * 6, graphs
    assert not lit_decay._compile._failed


# --------------------------------------------------------------------------------------------------------------------
# The hooks
# --------------------------------------------------------------------------------------------------------------------


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


def test_attach_is_idempotent() -> None:
    model = small_model()
    groups = lit_decay.param_groups(model, weight_decay=0.1, mode="l1", lr=0.01)
    optimizer = torch.optim.Adam(groups, lr=0.01)
    assert not is_attached(optimizer)
    terms = attach(optimizer)
    assert is_attached(optimizer)
    pre, post = len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)
    assert attach(optimizer) is terms and attach(optimizer) is terms
    assert (len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)) == (pre, post)

    # configure_adam attaches; attaching again does not apply the term twice.
    once, thrice = small_model(), small_model()
    thrice.load_state_dict(once.state_dict())
    opt_once = lit_decay.configure_adam(once, lr=0.01, weight_decay=0.5, mode="l1")
    opt_thrice = lit_decay.configure_adam(thrice, lr=0.01, weight_decay=0.5, mode="l1")
    assert is_attached(opt_once)
    attach(opt_thrice)
    attach(opt_thrice)
    x = torch.randn(4, 5)
    for model_, opt in ((once, opt_once), (thrice, opt_thrice)):
        for _ in range(3):
            opt.zero_grad()
            model_(x).square().mean().backward()
            opt.step()
    for a, b in zip(once.parameters(), thrice.parameters()):
        assert torch.equal(a, b)


def test_hand_built_optimizer_has_no_l1_term() -> None:
    model = small_model()
    optimizer = torch.optim.Adam(lit_decay.param_groups(model, weight_decay=0.1, mode="l1"), lr=0.01)
    assert not is_attached(optimizer)


@pytest.mark.parametrize("as_keyword", [True, False], ids=["closure=", "positional"])
@pytest.mark.parametrize("mode", ["l1", "decoupled_l1"])
def test_closure_runs_once_and_its_loss_is_returned(mode: str, as_keyword: bool) -> None:
    with_closure, without = small_model(), small_model()
    without.load_state_dict(with_closure.state_dict())
    opt_closure = lit_decay.configure_adam(with_closure, lr=0.05, weight_decay=0.2, mode=mode)
    opt_plain = lit_decay.configure_adam(without, lr=0.05, weight_decay=0.2, mode=mode)
    x, y = torch.randn(6, 5), torch.randn(6, 2)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt_closure.zero_grad()
        loss = F.mse_loss(with_closure(x), y)
        loss.backward()
        return loss

    for step in range(1, 4):
        returned = opt_closure.step(closure=closure) if as_keyword else opt_closure.step(closure)
        assert len(calls) == step  # exactly once per step
        assert isinstance(returned, torch.Tensor)
        assert torch.equal(returned, F.mse_loss(without(x), y))  # the closure's loss, before the step
        opt_plain.zero_grad()
        F.mse_loss(without(x), y).backward()
        opt_plain.step()
        # The closure path applied exactly what the plain path did (the term added after backward, once).
        for a, b in zip(with_closure.parameters(), without.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["l1", "decoupled_l1"])
def test_parameter_without_gradient_is_untouched(mode: str) -> None:
    used, unused = nn.Linear(4, 4), nn.Linear(4, 4)
    model = nn.ModuleDict({"used": used, "unused": unused})
    optimizer = lit_decay.configure_adam(model, lr=0.1, weight_decay=1.0, mode=mode)
    before_used, before_unused = used.weight.detach().clone(), unused.weight.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        used(torch.randn(3, 4)).square().mean().backward()
        optimizer.step()
    assert unused.weight.grad is None
    assert torch.equal(unused.weight, before_unused)
    assert unused.weight not in optimizer.state
    assert not torch.equal(used.weight, before_used)
    if mode == "decoupled_l1":  # lr·wd = 0.1 per step: a strong shrink that must not reach the unused layer
        assert (used.weight == 0).any()


def test_closure_with_unused_parameter() -> None:
    used, unused = nn.Linear(4, 4), nn.Linear(4, 4)
    model = nn.ModuleDict({"used": used, "unused": unused})
    optimizer = lit_decay.configure_adam(model, lr=0.1, weight_decay=1.0, mode="l1")
    before = copy.deepcopy(unused.state_dict())

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = used(torch.randn(3, 4)).square().mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert torch.equal(unused.weight, before["weight"]) and torch.equal(unused.bias, before["bias"])
