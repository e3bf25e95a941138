"""Book-keeping clipping: Opacus' per-sample clipping in one backward pass, no second one.

DP-SGD needs the sum over a batch of every sample's gradient clipped to norm C. Opacus
gets it either by materialising every per-sample gradient (hooks mode) or by taking the
per-sample *norms* from each layer's activations and output gradients and then running
a second backward of the loss re-weighted by each sample's clip factor (ghost
clipping). The second backward is most of what ghost clipping costs over a plain step
on this project's small networks (issue 16).

Book-keeping clipping (Bu, Wang, Zha & Karypis, "Differentially private optimization
on large model at small cost", ICML 2023) keeps ("book-keeps") what the first pass
already has and needs no second one. For a linear layer ``y = a W^T + b`` the gradient
of sample i's loss is ``g_i a_i^T`` for the weight and ``g_i`` for the bias, where
``a_i`` is the layer's input and ``g_i`` the gradient of the loss at its output, so

- its squared norm is ``|a_i|^2 |g_i|^2`` (ghost norm; with a sequence of T inputs per
  sample, ``sum_ts (a_t.a_s)(g_t.g_s)``), and
- the clipped sum is ``(c * G)^T A`` for the weight and ``c @ G`` for the bias, with
  ``c_i = min(1, C / (|grad_i| + 1e-6))``, Opacus' clip factor.

So one backward pass that asks autograd for the output gradient of every layer (and for
no weight gradient: those are replaced by the product above) gives all norms, then the
clip factors, then the clipped sum. A layer with parameters other than ``nn.Linear``
(a LayerNorm, an embedding) gets its per-sample gradients from Opacus' own registered
grad sampler, from the same activations and output gradients, and joins the same clip:
every sample's norm is over all of the module's parameters together, as in Opacus.

The result is Opacus' clipped sum up to float rounding (``tests/test_dp_modes.py``
checks the noisy update of every generator against hooks mode); the noise, its
multiplier, the clipping bound, the Poisson sampling and the ledger are the trainer's,
the same in every mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from opacus import GradSampleModule
from torch import nn

#: Added to a sample's norm before dividing, as Opacus does (``DPOptimizer``).
NORM_EPS = 1e-6
#: The dtype of the per-sample norms and the clipped sums. A linear layer's norm is
#: ``|a| |g|``, each factor squared on its own: in float32 the coordinator's weights can
#: make one row's activations huge (|a|^2 near 3e38, still finite) and its output
#: gradient tiny (each g_j^2 below float32's smallest subnormal, rounded to 0), so the
#: row's norm came out 0, its clip factor 1, and its gradient (|a| |g|, hundreds of times
#: C at C = 1e-6) entered the sum unclipped (tests/test_coordinator_attacks_3.py). In
#: float64 neither square leaves the range for any float32 input.
NORM_DTYPE = torch.float64


def _own_trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters(recurse=False) if p.requires_grad]


def _is_linear(layer: nn.Module) -> bool:
    """Exactly ``nn.Linear``: a subclass may compute something else in ``forward``."""
    return type(layer) is nn.Linear


def unsupported_layers(module: nn.Module) -> list[str]:
    """Trainable layers of ``module`` that book-keeping clipping cannot clip exactly:
    neither ``nn.Linear`` nor a layer with an Opacus grad sampler, a trainable layer
    with buffers (BatchNorm mixes samples; Opacus refuses it too), or a layer sharing a
    parameter with another (a tied weight's per-sample gradient is the sum over its
    layers, whose norm is not the sum of theirs).

    As with Opacus' hooks, a layer's parameters must reach the loss only through that
    layer's forward: a parameter read directly by another module's code has a gradient
    that no layer sees.
    """
    samplers = GradSampleModule.GRAD_SAMPLERS
    owners: dict[int, int] = {}
    for layer in module.modules():
        for p in _own_trainable(layer):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [f"{name or 'module'} ({type(layer).__name__})"
            for name, layer in module.named_modules(remove_duplicate=False)
            if _own_trainable(layer)
            and ((not _is_linear(layer) and type(layer) not in samplers)
                 or any(True for _ in layer.buffers(recurse=False))
                 or any(owners[id(p)] > 1 for p in _own_trainable(layer)))]


class BookKeeping:
    """Per-sample clipping of ``module``'s gradients in one backward (module doc).

    Use: ``with keeper.recording(): losses = per_sample_loss(module, batch)``, then
    ``keeper.clip_into_grad(losses)`` sets every trainable parameter's ``.grad`` to the
    sum of per-sample gradients, each clipped to ``max_grad_norm``. Forward passes
    outside ``recording`` (a GAN's generator step through the discriminator) are not
    kept and do not enter the clip.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        bad = unsupported_layers(module)
        if bad:
            raise ValueError(
                f"book-keeping clipping has no exact per-sample gradient for {', '.join(bad)}; "
                "train with mode='hooks' or 'ghost', or replace the layer")
        self.max_grad_norm = float(max_grad_norm)
        self.layers = [m for m in module.modules() if _own_trainable(m)]
        self.params = [p for m in self.layers for p in _own_trainable(m)]
        # per layer and forward call: the call's inputs (detached), its output, and their
        # versions (an in-place change after the layer ran, a ReLU(inplace=True) on its
        # output, would make the kept tensors not the layer's: refused at the clip)
        self._records: dict[nn.Module, list[tuple[list[torch.Tensor], torch.Tensor,
                                                   list[int]]]] = {}
        self._on = False
        self._handles = [layer.register_forward_hook(self._keep) for layer in self.layers]

    def _keep(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
              ) -> None:
        if self._on and torch.is_grad_enabled():
            self._records.setdefault(layer, []).append(
                ([t.detach() for t in inputs], output, _versions(*inputs, output)))

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Keep the inputs and outputs of the private layers for the next clip."""
        self._records.clear()
        self._on = True
        try:
            yield
        finally:
            self._on = False

    def clip_into_grad(self, losses: torch.Tensor) -> None:
        """``.grad`` of every trainable parameter := sum_i clip(grad of losses[i])."""
        batch = int(losses.shape[0])
        layers = list(self._records)
        for layer in layers:
            if any(_versions(*acts, out) != kept for acts, out, kept in self._records[layer]):
                raise ValueError(
                    f"book-keeping clipping: the input or output of {type(layer).__name__} "
                    "was modified in place after the layer ran (an inplace=True activation?); "
                    "its per-sample gradients would be wrong. Use inplace=False or "
                    "mode='hooks'")
        outputs = [out for layer in layers for _, out, _ in self._records[layer]]
        grads = (list(torch.autograd.grad(losses.sum(), outputs, allow_unused=True))
                 if outputs else [])
        # Norms, clip factors and the clipped sums in float64 (``NORM_DTYPE``), cast back
        # to the parameters' dtype at the end.
        squared = [torch.zeros(batch, dtype=NORM_DTYPE, device=losses.device)]
        pending = []  # per layer: (layer, activations, output gradients)
        for layer in layers:
            calls = self._records[layer]
            acts = [a[0] if _is_linear(layer) else a for a, _, _ in calls]
            backs = [torch.zeros_like(out) if g is None else g
                     for (_, out, _), g in zip(calls, grads[:len(calls)], strict=True)]
            del grads[:len(calls)]
            rows = [int(g.shape[0]) for g in backs]
            if any(r != batch for r in rows):
                raise ValueError(f"book-keeping clipping: {type(layer).__name__} saw batches of "
                                 f"{rows} rows for {batch} losses; every forward of the private "
                                 "module must see the step's samples, one per loss")
            squared.append(_squared_norms(layer, acts, backs))
            pending.append((layer, acts, backs))
        self._records.clear()
        norms = torch.stack(squared).sum(0).sqrt()
        finite = torch.isfinite(norms)
        factor = torch.where(finite, (self.max_grad_norm / (norms + NORM_EPS)).clamp(max=1.0),
                             torch.zeros_like(norms))
        if not bool(finite.all()):  # see ``finite_rows``
            pending = [(layer, [finite_rows(a, finite) for a in acts],
                        [finite_rows(g, finite) for g in backs]) for layer, acts, backs in pending]
        done: set[int] = set()
        for layer, acts, backs in pending:
            for p, g in _clipped_sums(layer, acts, backs, factor).items():
                p.grad = g.to(p.dtype)
                done.add(id(p))
        for p in self.params:  # a layer the loss did not reach: its clipped sum is 0
            if id(p) not in done:
                p.grad = torch.zeros_like(p)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records.clear()


def finite_rows(parts: torch.Tensor | list | tuple, keep: torch.Tensor) -> Any:
    """``parts`` (a tensor, or a layer call's inputs) with the samples not in ``keep``
    set to zero.

    A sample whose gradient norm is not finite (an overflow, 0 x inf) would put NaN in
    the clipped sum, and whether the reply's weights are NaN would then tell whether any
    sampled row makes the coordinator's model overflow: one patient's presence, known
    with certainty (a crafted model can overflow on "age above 75" alone). Such a sample
    contributes zero instead, which is a clipped contribution like any other (norm 0 <=
    C), decided from that sample alone, so the sensitivity argument holds unchanged.
    Its inputs and output gradients are zeroed too: 0 x inf is NaN in the products.
    """
    if isinstance(parts, list | tuple):
        return type(parts)(finite_rows(p, keep) for p in parts)
    if not isinstance(parts, torch.Tensor) or parts.dim() == 0 or parts.shape[0] != keep.shape[0]:
        return parts
    mask = keep.reshape(-1, *([1] * (parts.dim() - 1)))
    return torch.where(mask, parts, torch.zeros((), dtype=parts.dtype))


def _versions(*tensors: torch.Tensor) -> list[int]:
    """Autograd's in-place counters of the tensors (a detached view shares its base's)."""
    return [t._version for t in tensors]


def _as_sequence(parts: list[torch.Tensor]) -> torch.Tensor:
    """One layer's inputs (or output gradients) over its calls as [batch, T, features]."""
    return torch.cat([p.reshape(p.shape[0], math.prod(p.shape[1:-1]), p.shape[-1])
                      for p in parts], dim=1)


def _squared_norms(layer: nn.Module, acts: list[torch.Tensor], backs: list[torch.Tensor]
                   ) -> torch.Tensor:
    """Each sample's squared gradient norm over the layer's trainable parameters."""
    bias = _is_linear(layer) and layer.bias is not None and layer.bias.requires_grad
    if not _is_linear(layer):
        out = torch.zeros(backs[0].shape[0], dtype=NORM_DTYPE)
        for g in _per_sample(layer, acts, backs).values():
            out += g.reshape(g.shape[0], -1).to(NORM_DTYPE).square().sum(1)
        return out
    acts, backs = [a.to(NORM_DTYPE) for a in acts], [g.to(NORM_DTYPE) for g in backs]
    if len(acts) == 1 and acts[0].dim() == 2:  # one input per sample
        a2 = acts[0].square().sum(1) if layer.weight.requires_grad else torch.zeros(())
        # ghost norm: |a|^2 |g|^2 for the weight, plus |g|^2 for the bias
        return (a2 + 1.0 if bias else a2) * backs[0].square().sum(1)
    out = torch.zeros(backs[0].shape[0], dtype=NORM_DTYPE)
    a, g = _as_sequence(acts), _as_sequence(backs)  # T inputs per sample: Gram matrices
    if layer.weight.requires_grad:
        out += ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum((1, 2))
    if bias:
        out += g.sum(1).square().sum(1)
    return out


def _clipped_sums(layer: nn.Module, acts: list[torch.Tensor], backs: list[torch.Tensor],
                  factor: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """The layer's sum over samples of per-sample gradients times ``factor``."""
    if not _is_linear(layer):
        return {p: torch.einsum("i,i...->...", factor, g.to(NORM_DTYPE))
                for p, g in _per_sample(layer, acts, backs).items() if p.requires_grad}
    acts, backs = [a.to(NORM_DTYPE) for a in acts], [g.to(NORM_DTYPE) for g in backs]
    if len(acts) == 1 and acts[0].dim() == 2:  # one input per sample
        a, scaled = acts[0], backs[0] * factor[:, None]
    else:  # T inputs per sample: every (sample, t) row weighted by its sample's factor
        a, g = _as_sequence(acts), _as_sequence(backs)
        a = a.reshape(-1, a.shape[-1])
        scaled = (g * factor[:, None, None]).reshape(-1, g.shape[-1])
    sums: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        sums[layer.weight] = scaled.T @ a
    if layer.bias is not None and layer.bias.requires_grad:
        sums[layer.bias] = scaled.sum(0)
    return sums


def _per_sample(layer: nn.Module, acts: list, backs: list[torch.Tensor]
                ) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus' registered per-sample gradients of a non-linear layer (``acts``: each
    call's inputs, as Opacus' hooks keep them), summed over calls."""
    sampler = GradSampleModule.GRAD_SAMPLERS[type(layer)]
    total: dict[nn.Parameter, torch.Tensor] = {}
    for a, g in zip(acts, backs, strict=True):
        for p, gs in sampler(layer, a, g).items():
            if p.requires_grad:
                total[p] = total[p] + gs if p in total else gs
    return total
