"""The backward passes of a DP-SGD step, computing only what Opacus reads.

In hooks mode Opacus clips from the per-sample gradients its hooks build out of each
layer's activations and output gradients; in ghost mode it takes the per-sample norms
from the same hooks, then the update from a second backward of the loss re-weighted by
each sample's clipping factor. Neither reads the ``.grad`` that a plain
``loss.backward()`` also accumulates in the (first) pass: Opacus overwrites it
(hooks) or zeroes it (ghost). On a layer that is a weight-gradient matrix product per
layer per step, the same size as the one that carries the gradient on to the layer
below: on the MIMIC-III demo's 1,241-column layers, most of a small batch's step.

``gradient_anchors`` picks one parameter per layer (its smallest, the bias where there is one)
and the pass asks autograd for gradients of those only (``inputs=``). Every layer's
output gradient is still computed, because each layer's anchor lies below it, so
Opacus' hooks fire exactly as before with the same activations and output gradients;
only weight gradients that nobody reads are skipped. The clipped sum, hence the
update and the ledger, is unchanged: ``tests/test_site_speed.py`` compares a step with
Opacus' own ``loss.backward()`` and ``DPTensorFastGradientClipping.backward()``.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)


def gradient_anchors(module: torch.nn.Module) -> list[torch.Tensor]:
    """One trainable parameter of every layer that has one: its smallest."""
    out = []
    for layer in module.modules():
        own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
        if own:
            out.append(min(own, key=lambda p: p.numel()))
    return out


def hooks_backward(losses: torch.Tensor, wanted: list[torch.Tensor]) -> None:
    """Hooks mode: one backward that makes Opacus' per-sample gradients."""
    torch.autograd.backward(losses.sum(), inputs=wanted)


def ghost_backward(module: GradSampleModuleFastGradientClipping, optimizer: torch.optim.Optimizer,
                   losses: torch.Tensor, wanted: list[torch.Tensor]) -> torch.Tensor | None:
    """Ghost clipping: Opacus' ``DPTensorFastGradientClipping.backward`` ("sum" losses)
    with the first pass, which only feeds the hooks' norms, limited to ``wanted``.

    Returns the mask of samples whose gradient norm is not finite, without the second
    pass, when there are any: their re-weighted loss would put NaN in every weight's
    gradient (0 x inf), so the caller takes the step again without them
    (``bookkeeping.finite_rows`` says why that is sound). None when the pass is done."""
    torch.autograd.backward(losses.sum(dim=0), inputs=wanted, retain_graph=True)
    optimizer.zero_grad()
    coeff = module.get_clipping_coef()
    bad = ~torch.isfinite(module.per_sample_gradient_norms)
    if bool(bad.any()):
        return bad
    second = torch.sum(coeff.to(losses.device) * losses)
    module.disable_hooks()
    try:
        second.backward()
    finally:
        module.enable_hooks()
    return None
