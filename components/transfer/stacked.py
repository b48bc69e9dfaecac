"""Stacked readouts (design.md section 13): N readouts into one target, trained as one model.

Members of a stack share the target, its labels, the input channel count and every setting but
the seed. They are folded into one network along the channel axis: member i owns channels
[i*C, (i+1)*C) of every activation, each conv becomes a grouped conv (groups = N), each batch
norm one of N*C channels (its statistics are per channel, so per member), each linear layer a
batched matmul. One forward/backward per step then serves all members, each with its own
initialisation, batch order (row b of the batch is a different image for each member),
batch-norm statistics and loss, so each gets the numbers `train_readout` would give it alone, up
to floating-point reordering: AdamW is elementwise and the summed loss gives each member only
its own gradient. (`torch.func.vmap` over stacked parameters gives the same numbers but was
1.7x slower here: it moves every activation between member-major and channel layouts.)

It pays where a readout is overhead-bound (docs/benchmarks.md): on one CPU thread, a pixel
readout from 10 labelled images (every step one small batch) trains 1.35x faster in stacks of 4,
but the study's pixel readouts no faster: their decoder is compute-bound, already at 40% of a
matrix product's FLOP rate, and oneDNN's grouped conv backward is slower than N separate convs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from components.models import ModelConfig, channels_last
from components.tasks import Task, batch_loss
from components.training import nanmean
from components.transfer.readout import (
    ReadoutResult,
    ReadoutSettings,
    _autocast,
    _test_losses,
    batches,
    build_readout,
    label_tensor,
    train_epochs,
    train_readout,
    validation_split,
)


@dataclass(frozen=True, eq=False)
class StackMember:
    """One readout of a stack: its cached features, its seed (initialisation + batch order) and
    its fit/validation split's (`ReadoutSettings.split_seed`: a stack may hold several replicates)."""

    transfer_x: np.ndarray  # (N_transfer, C, h, w), rows sorted by image id; a float16 memmap is fine
    test_x: np.ndarray  # (N_test, C, h, w)
    seed: int
    split_seed: int = 0


def train_stacked(
    *,
    task: Task,
    model: ModelConfig,
    image_size: int,
    members: Sequence[StackMember],
    transfer_y: np.ndarray,
    test_y: np.ndarray,
    test_ids: np.ndarray,
    settings: ReadoutSettings,
    device: torch.device,
    channels: int | None = None,
) -> list[ReadoutResult | None]:
    """Train every member as `train_readout(..., settings=replace(settings, seed=member.seed,
    split_seed=member.split_seed))` would, in one stacked model; results in member order.

    A member whose loss or gradient turns non-finite (or whose results do, see `_failed`) gets no
    more gradient (the others go on: theirs never depend on it) and is retrained alone at the
    end; None if it fails again.
    `seconds` of a member is the stack's wall time / N (plus its solo retrain, if any).
    """
    if not members:
        return []
    start, n = time.perf_counter(), len(members)
    n_rows, in_channels = len(members[0].transfer_x), members[0].transfer_x.shape[1]
    if any(len(m.transfer_x) != n_rows or m.transfer_x.shape[1] != in_channels for m in members):
        raise ValueError("stack members need the same transfer rows and input channels")
    splits = [validation_split(n_rows, settings.val_fraction, m.split_seed) for m in members]
    n_fit = len(splits[0][0])  # the same for every member: same rows, same fraction
    nets = []
    for m in members:  # each initialised exactly as train_readout initialises it alone
        torch.manual_seed(m.seed)
        nets.append(build_readout(task, in_channels, model, image_size, settings.width, channels))
    stack = channels_last(_fold(nets)).to(device)
    params = list(stack.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    rngs = [np.random.default_rng(m.seed) for m in members]
    alive = torch.ones(n, dtype=torch.bool, device=device)

    def order():  # each member's batch order, as it would draw it alone (the same sizes for all)
        return zip(*[batches(n_fit, settings.batch_size, rng) for rng in rngs], strict=True)

    def per_image(idxs) -> torch.Tensor:  # (N, B)
        rows = [fit_rows[i] for (fit_rows, _), i in zip(splits, idxs, strict=True)]
        batch = np.stack([m.transfer_x[r] for m, r in zip(members, rows, strict=True)], axis=1)
        x = torch.from_numpy(batch).to(device, non_blocking=True).float().flatten(1, 2)  # (B, N*C, h, w)
        y = label_tensor(np.stack([transfer_y[r] for r in rows], axis=1), task, device)  # (B, N, ...)
        with _autocast(device):
            pred = stack(x)  # (B, N*C_out, ...)
        pred = pred.float().unflatten(1, (n, -1)).flatten(0, 1)  # (B*N, C_out, ...)
        return task.per_image_loss(pred, y.flatten(0, 1)).view(-1, n).t()

    def update(per_image: torch.Tensor) -> None:
        nonlocal alive
        losses = torch.stack([batch_loss(loss) for loss in per_image])  # each member's objective
        optimizer.zero_grad(set_to_none=True)
        ok = alive & losses.isfinite()
        torch.where(ok, losses, torch.zeros_like(losses)).sum().backward()
        for p in params:  # a member with a non-finite gradient stops learning, for good
            ok &= p.grad.reshape(n, -1).isfinite().all(1)
        alive &= ok
        for p in params:
            mask = alive.repeat_interleave(len(p) // n).view(-1, *([1] * (p.dim() - 1)))
            p.grad.copy_(torch.where(mask, p.grad, torch.zeros_like(p.grad)))
        optimizer.step()

    history = train_epochs(stack, settings.epochs, order, per_image, update) or [[] for _ in members]
    share, alive_flags = (time.perf_counter() - start) / n, alive.tolist()
    common = {
        "task": task,
        "model": model,
        "image_size": image_size,
        "transfer_y": transfer_y,
        "test_y": test_y,
        "test_ids": test_ids,
        "device": device,
        "channels": channels,
    }
    state = stack.state_dict()
    results: list[ReadoutResult | None] = []
    for i, (m, net) in enumerate(zip(members, nets, strict=True)):
        t0 = time.perf_counter()
        net.load_state_dict({k: _member(state[k], v.shape, n, i) for k, v in net.state_dict().items()})
        net.to(device)
        val = splits[i][1]
        val_loss = nanmean(_test_losses(net, _identity, m.transfer_x[val], transfer_y[val], task, device))
        losses = _test_losses(net, _identity, m.test_x, test_y, task, device)
        seconds = share + time.perf_counter() - t0
        result = ReadoutResult(np.asarray(test_ids).astype(str), losses, tuple(history[i]), seconds, val_loss)
        if alive_flags[i] and not _failed(result):
            results.append(result)
            continue
        solo = train_readout(
            **common,
            transfer_x=m.transfer_x,
            test_x=m.test_x,
            settings=replace(settings, seed=m.seed, split_seed=m.split_seed),
        )
        results.append(None if _failed(solo) else replace(solo, seconds=solo.seconds + share))
    return results


class _MemberLinear(nn.Module):
    """N linear layers on (B, N*in) -> (B, N*out), member-major as nn.Flatten leaves them."""

    def __init__(self, layers: Sequence[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))  # (N, out, in)
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))  # (N, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(1, (len(self.weight), -1))  # (B, N, in)
        return (torch.einsum("bni,noi->bno", x, self.weight) + self.bias).flatten(1)


_ELEMENTWISE = (nn.ReLU, nn.Upsample, nn.Flatten, nn.Identity)  # act on each channel alone


def _fold(modules: Sequence[nn.Module]) -> nn.Module:
    """N same-architecture modules -> one on N-times-wider, member-major channels. A container's
    forward must only compose its children (true of the readout and the decoders; the
    equivalence tests check it); an unknown layer type is an error, never a silent mix."""
    first, n = modules[0], len(modules)
    if isinstance(first, nn.Conv2d) and first.groups == 1:
        conv = nn.Conv2d(
            n * first.in_channels, n * first.out_channels, first.kernel_size, first.stride,
            first.padding, first.dilation, groups=n, bias=first.bias is not None,
        )  # fmt: skip
        conv.load_state_dict({k: torch.cat([m.state_dict()[k] for m in modules]) for k in conv.state_dict()})
        return conv
    if isinstance(first, nn.BatchNorm2d):
        norm = nn.BatchNorm2d(n * first.num_features, first.eps, first.momentum)
        norm.load_state_dict(
            {
                k: torch.cat([m.state_dict()[k] for m in modules]) if v.dim() else v
                for k, v in first.state_dict().items()
            }
        )
        return norm
    if isinstance(first, nn.Linear):
        return _MemberLinear(modules)
    if isinstance(first, _ELEMENTWISE):
        return copy.deepcopy(first)
    if not first._modules or first._parameters or first._buffers:
        raise TypeError(f"cannot stack {type(first).__name__}")
    out = copy.copy(first)
    out._modules = {k: _fold([m._modules[k] for m in modules]) for k in first._modules}
    return out


def _member(stacked: torch.Tensor, shape: torch.Size, n: int, i: int) -> torch.Tensor:
    """Member i's part of a folded parameter or buffer (a scalar, the batch count, is shared)."""
    return stacked.detach().reshape(n, *shape)[i] if stacked.dim() else stacked


def _failed(result: ReadoutResult) -> bool:
    """Diverged: a non-finite training history, or no finite test loss (train_readout counts NaN
    predictions as unlabelled images, so NaN weights leave its history finite)."""
    return not np.isfinite(result.train_losses).all() or not np.isfinite(result.mean_loss)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
