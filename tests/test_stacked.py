"""Stacked readouts: each member gets the numbers `train_readout` gives it alone, within the
tolerance of float32 arithmetic.

Stacked and solo readouts are equivalent, not bit for bit the same: a stack runs one grouped
convolution where a solo readout runs its own, and oneDNN picks kernels (and so the order of
float32 accumulation) by layer shape and CPU instruction set. One step therefore agrees to float32
rounding (checked tightly here), and a whole training drifts a little from those rounding
differences, step after step: it is checked against what matters, the difference another seed
makes, measured on the same host in the same test.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from components.data.shards import NO_LABEL
from components.models import ModelConfig
from components.tasks import Loss, TaskKind, get_task
from components.transfer import ReadoutSettings, StackMember, build_readout, train_readout, train_stacked
from components.transfer.stacked import _fold, _member

pytestmark = pytest.mark.numerics  # CI runs these again under another CPU kernel path

MODEL = ModelConfig(width=8, representation_channels=8, downsample=4)
SIZE, N_TRANSFER, N_TEST = 16, 40, 20
SETTINGS = ReadoutSettings(epochs=3, batch_size=8, width=8, lr=3e-3)
CPU = torch.device("cpu")


def _labels(task, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random labels with holes: unlabelled pixels/elements, and one image with no label."""
    shape = (n, *task.output_shape(SIZE))
    if task.loss is Loss.CROSS_ENTROPY:
        y = rng.integers(0, task.channels, (n, SIZE, SIZE)).astype(np.uint8)
        y[rng.random(y.shape) < 0.1] = NO_LABEL
        y[0] = NO_LABEL
        return y
    y = (rng.random(shape) < 0.5 if task.loss is Loss.BCE else rng.random(shape)).astype(np.float32)
    if task.kind is TaskKind.PIXEL:
        y[rng.random(shape) < 0.1] = np.nan
    y[0] = np.nan
    return y


def _case(task_name: str, seeds=(1, 2, 3), features=None):
    task, rng = get_task(task_name), np.random.default_rng(0)
    members = [
        StackMember(
            rng.standard_normal((N_TRANSFER, 8, 4, 4)).astype(np.float16),
            rng.standard_normal((N_TEST, 8, 4, 4)).astype(np.float16),
            seed,
        )
        for seed in seeds
    ]
    if features is not None:  # every member on the same features
        members = [replace(m, transfer_x=members[0].transfer_x, test_x=members[0].test_x) for m in members]
    common = {
        "task": task,
        "model": MODEL,
        "image_size": SIZE,
        "transfer_y": _labels(task, N_TRANSFER, rng),
        "test_y": _labels(task, N_TEST, rng),
        "test_ids": np.array([f"img-{i}" for i in range(N_TEST)]),
        "device": CPU,
    }
    return members, common


def _solo(member: StackMember, common: dict):
    return train_readout(
        **common,
        transfer_x=member.transfer_x,
        test_x=member.test_x,
        settings=replace(SETTINGS, seed=member.seed, split_seed=member.split_seed),
    )


# A stack's member may differ from its solo readout by at most this share of the difference
# another seed makes (mean absolute per-image test loss). Measured: <= 0.04 under SSE4.1, AVX2
# and AVX-512 kernels (0 to 1e-7 absolute where the kernels happen to match); a member that read
# another member's weights, features or batch-norm statistics differs as much as another seed (1).
DRIFT_SHARE = 0.2


def _assert_same(stacked, solo, other_seed):
    """`stacked` and `solo` are one readout trained in a stack and alone; `other_seed` is the solo
    readout of another seed on the same host: the reference for how far is far."""
    np.testing.assert_array_equal(stacked.image_ids, solo.image_ids)
    finite = np.isfinite(solo.losses)
    np.testing.assert_array_equal(np.isfinite(stacked.losses), finite)
    drift = np.mean(np.abs(stacked.losses[finite] - solo.losses[finite]))
    seed_effect = np.mean(np.abs(other_seed.losses[finite] - solo.losses[finite]))
    assert drift <= DRIFT_SHARE * seed_effect, (drift, seed_effect)
    train_drift = np.abs(np.subtract(stacked.train_losses, solo.train_losses)).mean()
    train_seed = np.abs(np.subtract(other_seed.train_losses, solo.train_losses)).mean()
    assert train_drift <= DRIFT_SHARE * train_seed, (train_drift, train_seed)


@pytest.mark.parametrize("task_name", ["normal", "segment_semantic", "class_object", "room_layout"])
def test_each_member_matches_its_solo_readout(task_name):
    """l1 / cross-entropy pixel tasks and bce / l2 vector tasks. Eval-mode losses use the batch-norm
    running statistics, so this also checks that each member keeps its own."""
    members, common = _case(task_name)
    results = train_stacked(**common, members=members, settings=SETTINGS)
    assert len(results) == len(members)
    solos = [_solo(member, common) for member in members]
    for i, (result, solo) in enumerate(zip(results, solos, strict=True)):
        assert np.isnan(solo.losses[0]) and np.isfinite(solo.losses[1:]).all()  # the unlabelled image
        _assert_same(result, solo, other_seed=solos[(i + 1) % len(solos)])
        assert result.seconds > 0


def test_replicates_differ_by_seed_only():
    members, common = _case("normal", seeds=(5, 6, 5), features="shared")
    a, b, c = train_stacked(**common, members=members, settings=SETTINGS)
    assert not np.allclose(a.losses[1:], b.losses[1:])
    np.testing.assert_allclose(a.losses, c.losses, rtol=1e-6)
    assert a.train_losses == pytest.approx(c.train_losses, rel=1e-6)


def test_members_of_other_replicates_fit_on_their_own_rows():
    """A stack may hold several replicates, each with its own fit/validation split: each member
    trains and validates as it would alone on its split."""
    members, common = _case("normal", seeds=(5, 5, 6), features="shared")
    members = [replace(m, split_seed=s) for m, s in zip(members, (0, 11, 11), strict=True)]
    results = train_stacked(**common, members=members, settings=SETTINGS)
    solos = [_solo(m, common) for m in members]
    for i, (result, solo) in enumerate(zip(results, solos, strict=True)):
        _assert_same(result, solo, other_seed=solos[(i + 1) % len(solos)])
    split_effect = abs(solos[1].val_loss - solos[0].val_loss)  # same seed, other rows
    assert split_effect > 0
    for result, solo in zip(results[:2], solos[:2], strict=True):
        assert abs(result.val_loss - solo.val_loss) <= DRIFT_SHARE * split_effect


def test_a_diverging_member_fails_alone_and_spoils_no_other():
    members, common = _case("normal")
    bad = members[1].transfer_x.copy()
    bad[::3] = np.inf  # NaN predictions from the first step on
    members[1] = replace(members[1], transfer_x=bad)
    results = train_stacked(**common, members=members, settings=SETTINGS)
    assert results[1] is None  # diverged in the stack, and again when retrained alone
    solos = {i: _solo(members[i], common) for i in (0, 2)}
    for i, other in ((0, 2), (2, 0)):
        _assert_same(results[i], solos[i], other_seed=solos[other])


def test_folded_batch_norm_keeps_each_members_statistics():
    task = get_task("normal")
    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        nets.append(build_readout(task, 8, MODEL, SIZE, 8))
    stack = _fold(nets).train()
    xs = [torch.randn(4, 8, 4, 4), 3 + torch.randn(4, 8, 4, 4)]
    out = stack(torch.stack(xs, 1).flatten(1, 2)).unflatten(1, (2, -1))
    state = stack.state_dict()
    for i, (net, x) in enumerate(zip(nets, xs, strict=True)):
        torch.testing.assert_close(out[:, i], net.train()(x), rtol=1e-4, atol=1e-5)
        for key, value in net.state_dict().items():
            torch.testing.assert_close(_member(state[key], value.shape, 2, i), value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task_name", ["normal", "segment_semantic", "room_layout"])
def test_one_step_of_a_stack_is_each_members_step(task_name):
    """Forward and backward of a folded stack against each member alone, one batch: the same
    arithmetic up to float32 accumulation order. The tolerance: a kernel sums K products (K <= 8
    channels x 9 taps x batch 4 here, a few hundred) in another order, which changes a float32 sum
    by up to about K * 2**-24 of its terms' magnitude: 1e-4 relative to the largest gradient,
    ten times that bound, and orders of magnitude below the gradient itself."""
    task = get_task(task_name)
    nets = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        nets.append(build_readout(task, 8, MODEL, SIZE, 8).train())
    stack = _fold(nets).train()
    xs = [torch.randn(4, 8, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    out = stack(torch.stack(xs, 1).flatten(1, 2)).unflatten(1, (3, -1))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weights).sum().backward()
    grads = {name: p.grad for name, p in stack.named_parameters()}
    for i, (net, x) in enumerate(zip(nets, xs, strict=True)):
        solo = net(x)
        torch.testing.assert_close(out[:, i].detach(), solo.detach(), rtol=1e-4, atol=1e-5)
        (solo * weights[:, i]).sum().backward()
        for name, p in net.named_parameters():
            scale = p.grad.abs().max().item()
            got = _member(grads[name], p.shape, 3, i)
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-4 * scale + 1e-12)


def test_a_stack_needs_members_of_one_shape():
    members, common = _case("normal", seeds=(1, 2))
    assert train_stacked(**common, members=[], settings=SETTINGS) == []
    members[1] = replace(members[1], transfer_x=members[1].transfer_x[:, :4])
    with pytest.raises(ValueError, match="same transfer rows and input channels"):
        train_stacked(**common, members=members, settings=SETTINGS)
