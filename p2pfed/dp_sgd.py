"""Record-level differential privacy: DP-SGD with Poisson sampling (Abadi et al. 2016).

Rules of this file (normative text: spec/privacy.md, "Record-level DP"):

* **One step.** Every training record joins the step's batch independently with
  probability ``q`` (Poisson sampling, drawn from the node's noise generator, never from a
  replayable seed: the amplification by subsampling needs the batch to stay secret). Each
  sampled record's gradient is computed on its own (``torch.func.vmap`` of
  ``torch.func.grad``), clipped to L2 norm ``C`` over *all* parameters together, the
  clipped gradients are summed, Gaussian noise of standard deviation ``sigma * C`` is added
  to every coordinate, and the sum is divided by the *expected* batch size ``q * n`` (as
  Opacus does; an empty batch still takes a step of pure noise). Plain SGD then moves the
  parameters by ``-lr`` times that.
* **Accounting.** A step is the Poisson-subsampled Gaussian mechanism with noise
  multiplier ``z = sigma`` under add/remove-one-record adjacency (the sum's sensitivity is
  ``C``); :func:`p2pfed.accountant.sampled_gaussian_rdp` gives its RDP, and the node's
  ledger records the steps of each round before the model leaves the node.
* **What a task provides.** Its ``load_data`` returns ``NodeData.train`` as a tuple
  ``(inputs, targets)`` of tensors with one row per record, and its model must treat
  records independently (no BatchNorm in training mode: it mixes records, so per-record
  gradients would not bound one record's influence). The loss is the task's optional
  ``loss(outputs, targets) -> mean loss`` method; without it, integer class targets get
  ``cross_entropy``. Everything else (sampling, clipping, noise, steps, accounting) is done
  here, so a task cannot get the privacy wrong.

Example::

    >>> import numpy as np, torch
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(100, 3), torch.randint(0, 2, (100,))
    >>> result = dp_sgd(model, (x, y), steps=5, sampling_rate=0.1, clip_norm=1.0,
    ...                 noise_multiplier=1.0, lr=0.1, rng=np.random.default_rng(0))
    >>> result.steps
    5
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from p2pfed.errors import ConfigError

__all__ = [
    "DpSgdResult",
    "LossFunction",
    "check_model",
    "dp_sgd",
    "per_sample_gradients",
    "task_loss",
]

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(outputs, targets) -> scalar``: the mean loss of a batch."""

_NORM_LAYERS = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.SyncBatchNorm,
)
# per-sample gradients of a big batch at once can exhaust memory; chunks bound it
_CHUNK = 256


@dataclass(frozen=True)
class DpSgdResult:
    """What :func:`dp_sgd` did: steps taken, records sampled in all, mean training loss."""

    steps: int
    samples: int
    loss: float


def check_model(model: torch.nn.Module) -> None:
    """Refuse (``ConfigError``) a model whose layers mix records within a batch."""
    for name, module in model.named_modules():
        if isinstance(module, _NORM_LAYERS):
            raise ConfigError(
                f"record-level DP needs per-record gradients, but layer {name or 'model'} is "
                f"a {type(module).__name__}, which mixes the records of a batch; use "
                "GroupNorm or LayerNorm in the task's model, or a federation with --dp node"
            )


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, targets)


def task_loss(task: object, targets: torch.Tensor) -> LossFunction:
    """The task's ``loss`` method, or cross-entropy for integer class targets."""
    loss = getattr(task, "loss", None)
    if callable(loss):
        return loss
    if not targets.dtype.is_floating_point and not targets.dtype.is_complex:
        return _cross_entropy
    raise ConfigError(
        "record-level DP trains the task's model itself and needs its loss: give the task "
        "a method loss(outputs, targets) returning the mean loss of a batch (targets here "
        f"are {targets.dtype}, so cross-entropy cannot be assumed)"
    )


def training_tensors(train: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``NodeData.train`` as ``(inputs, targets)``, or ``ConfigError`` saying what is needed."""
    if (
        not isinstance(train, tuple | list)
        or len(train) != 2
        or not all(isinstance(t, torch.Tensor) for t in train)
        or train[0].shape[:1] != train[1].shape[:1]
    ):
        raise ConfigError(
            "record-level DP needs the task's load_data to return NodeData.train as a tuple "
            "(inputs, targets) of tensors with one row per record"
        )
    return train[0], train[1]


def per_sample_gradients(
    model: torch.nn.Module,
    loss: LossFunction,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The gradient of ``loss`` for each record separately: name -> ``(batch, *shape)``.

    Computed with ``torch.func.vmap(torch.func.grad(...))`` over the records, the model
    evaluated on a batch of one each time; equal (to float rounding) to a loop of
    single-record backward passes.
    """
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss(out, y.unsqueeze(0))

    per_record = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")
    chunks = [
        per_record(params, inputs[i : i + _CHUNK], targets[i : i + _CHUNK])
        for i in range(0, len(inputs), _CHUNK)
    ]
    return {k: torch.cat([c[k] for c in chunks]) for k in params}


def _clipped_sum(grads: Mapping[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    flat = [g.reshape(g.shape[0], -1).double() for g in grads.values()]
    norms = torch.cat(flat, dim=1).norm(dim=1)
    # min(1, C / norm): a record inside the ball is unchanged; the float64 norm keeps the
    # scaled gradient's norm at C up to float32 rounding of the factor
    factor = (clip_norm / norms.clamp_min(1e-30)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", factor.to(g.dtype), g) for k, g in grads.items()}


def dp_sgd(
    model: torch.nn.Module,
    train: Any,
    *,
    steps: int,
    sampling_rate: float,
    clip_norm: float,
    noise_multiplier: float,
    lr: float,
    rng: np.random.Generator,
    loss: LossFunction | None = None,
) -> DpSgdResult:
    """Run ``steps`` DP-SGD steps on ``model`` in place (module docstring); return a report.

    ``rng`` draws both the Poisson sample and the noise: in a node, the generator of
    :func:`p2pfed.dp.noise_generator`. ``loss`` defaults to cross-entropy for integer
    targets. The caller records ``steps`` subsampled steps at ``sampling_rate`` with
    noise multiplier ``noise_multiplier`` in the privacy ledger before the model leaves.
    """
    inputs, targets = training_tensors(train)
    loss_fn = loss if loss is not None else task_loss(None, targets)
    check_model(model)
    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    n = len(targets)
    expected_batch = max(sampling_rate * n, 1e-12)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    std = noise_multiplier * clip_norm
    total_loss, seen = 0.0, 0
    was_training = model.training
    model.train()
    try:
        for _ in range(steps):
            mask = rng.random(n) < sampling_rate
            index = torch.from_numpy(np.flatnonzero(mask))
            if len(index):
                xb, yb = inputs[index], targets[index]
                grads = per_sample_gradients(model, loss_fn, xb, yb)
                summed = _clipped_sum(grads, clip_norm)
                with torch.no_grad():
                    total_loss += float(loss_fn(model(xb), yb)) * len(index)
                seen += len(index)
            else:
                summed = {k: torch.zeros_like(p) for k, p in named}
            with torch.no_grad():
                for k, p in named:
                    noise = torch.from_numpy(rng.standard_normal(p.shape)).to(p.dtype)
                    step = (summed[k].to(p.device) + std * noise.to(p.device)) / expected_batch
                    p.add_(step, alpha=-lr)
    finally:
        model.train(was_training)
    return DpSgdResult(steps=steps, samples=seen, loss=total_loss / seen if seen else math.nan)
