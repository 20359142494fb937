"""The eager PyTorch per-task MAML loop that issue 6 measures fmljax against.

What a PyTorch user writes for MAML on Omniglot (as in the learn2learn / higher / the MAML
PyTorch ports): a Python loop over the tasks of a meta-batch, each doing the inner step(s) with
``torch.autograd.grad(..., create_graph=True)`` (second order) on functional weights, the query
loss backpropagated into the meta-parameters, then one Adam step. Same network as
``fmljax.conv4``: 4 x [3x3 conv, 64 filters, stride 2 'SAME' (or stride 1 + 2x2 max-pool),
batch norm on the batch's own statistics with a learned offset, ReLU], spatial mean, linear head.

Only imported by ``throughput.py --pytorch``; torch is not a dependency of fmljax
(``pip install torch==2.13.0``, the CPU build).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _init(ways: int, filters: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = []
    cin = 1
    for _ in range(4):
        limit = (6.0 / (9 * cin + 9 * filters)) ** 0.5
        params.append((torch.rand(filters, cin, 3, 3, generator=g) * 2 - 1) * limit)  # w
        params.append(torch.zeros(filters))  # conv bias
        params.append(torch.zeros(filters))  # batch-norm offset
        cin = filters
    limit = (6.0 / (filters + ways)) ** 0.5
    params.append((torch.rand(filters, ways, generator=g) * 2 - 1) * limit)
    params.append(torch.zeros(ways))
    return [p.requires_grad_() for p in params]


def _forward(params: list[torch.Tensor], x: torch.Tensor, pooled: bool) -> torch.Tensor:
    h = x
    for i in range(4):
        w, b, off = params[3 * i : 3 * i + 3]
        if pooled:
            h = F.conv2d(h, w, b, stride=1, padding=1)
        else:  # TF 'SAME' with stride 2 on even sizes pads (0, 1); odd sizes (1, 1)
            ph = max((-(-h.shape[-1] // 2) - 1) * 2 + 3 - h.shape[-1], 0)
            h = F.pad(h, (ph // 2, ph - ph // 2, ph // 2, ph - ph // 2))
            h = F.conv2d(h, w, b, stride=2)
        h = F.batch_norm(h, None, None, torch.ones_like(off), off, training=True, eps=1e-3)
        h = F.relu(h)
        if pooled:
            h = F.max_pool2d(h, 2)
    return h.mean(dim=(2, 3)) @ params[-2] + params[-1]


class EagerMAML:
    """``call()`` runs one meta-step (all tasks of the meta-batch, then Adam)."""

    def __init__(self, support, query, *, ways, inner_lr, inner_steps, pooled, second_order):
        # support/query: dicts of numpy arrays [T, B, 28, 28, 1] / [T, B]; converted to NCHW once
        to_x = lambda a: torch.from_numpy(np.asarray(a)).permute(0, 1, 4, 2, 3).contiguous()
        to_y = lambda a: torch.from_numpy(np.asarray(a)).long()
        self.sx, self.sy = to_x(support["x"]), to_y(support["y"])
        self.qx, self.qy = to_x(query["x"]), to_y(query["y"])
        self.params = _init(ways)
        self.opt = torch.optim.Adam(self.params, lr=1e-3)
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.pooled, self.second_order = pooled, second_order

    def call(self) -> float:
        self.opt.zero_grad()
        tasks = self.sx.shape[0]
        total = 0.0
        for t in range(tasks):
            fast = self.params
            for _ in range(self.inner_steps):
                loss = F.cross_entropy(_forward(fast, self.sx[t], self.pooled), self.sy[t])
                grads = torch.autograd.grad(loss, fast, create_graph=self.second_order)
                fast = [p - self.inner_lr * g for p, g in zip(fast, grads, strict=True)]
            qloss = F.cross_entropy(_forward(fast, self.qx[t], self.pooled), self.qy[t])
            (qloss / tasks).backward()
            total += float(qloss.detach())
        self.opt.step()
        return total / tasks
