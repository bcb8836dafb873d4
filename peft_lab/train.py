"""The short training loop, written out by hand on purpose (notebook 01, "Full fine-tuning baseline").

It trains whatever parameters have ``requires_grad=True``. Full fine-tuning, LoRA, adapters and prefixes
all differ only in *which* parameters those are, so every method notebook calls this same function.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import validate
from .core import require_adapters_active
from .data import collate


@dataclass
class History:
    """What :func:`train` observed: loss per step, eval metrics at intervals, wall time."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    metric: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)  # seconds since start, per training step
    trainable_params: int = 0

    @property
    def final_metric(self) -> float | None:
        return self.metric[-1] if self.metric else None

    @property
    def seconds(self) -> float:
        return self.wall_time[-1] if self.wall_time else 0.0


def _quiet() -> bool:
    # CI logs and nbval runs get no progress bar; notebooks opened by a person do.
    return bool(os.environ.get("CI")) or bool(os.environ.get("PEFT_LAB_QUIET"))


def _lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


MAX_STEPS_VAR = "PEFT_LAB_MAX_STEPS"


def _max_steps() -> int:
    value = os.environ.get(MAX_STEPS_VAR, "")
    if not value:
        return 2**62
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{MAX_STEPS_VAR}={value!r}: expected a positive whole number of steps, or unset")
    return int(value)


def train(
    model: torch.nn.Module,
    examples: list[dict],
    *,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    schedule: str = "constant",
    grad_clip: float | None = 1.0,
    eval_fn: Callable[[torch.nn.Module], float] | None = None,
    eval_every: int | None = None,
    seed: int = 0,
    pad_id: int = 0,
    progress: bool | None = None,
    desc: str = "train",
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None,
) -> History:
    """AdamW on the trainable parameters of ``model`` for ``steps`` steps over ``examples``.

    ``examples`` are ``{"input_ids", "labels"}`` lists (see :func:`peft_lab.data.encode_task`); batches are
    drawn without replacement from a permutation seeded by ``seed``, reshuffled each epoch. ``eval_fn(model)``
    returns a number (e.g. accuracy), recorded at step 0, every ``eval_every`` steps and at the end.
    ``progress=None`` shows a ``tqdm.auto`` bar except under CI (``CI`` or ``PEFT_LAB_QUIET`` set).
    ``PEFT_LAB_MAX_STEPS=N`` in the environment caps every run at N steps, the schedule fitted to the shorter
    run. The test command sets it to check quickly that every cell of a notebook runs on tiny-llama; the
    numbers such a run trains to are not meant to be read. Unset, nothing is capped.
    ``optimizer(model)``, if given, builds the optimizer instead of ``AdamW(lr, weight_decay)`` — e.g. LoRA+'s
    two rates (``lambda m: loraplus_optimizer(m, lr, 16)``, notebook 08); the schedule scales each of its
    groups' own rates.
    """
    model = validate.require_module("model", model)
    steps = min(validate.require_int("steps", steps, min=1), _max_steps())
    batch_size = validate.require_int("batch_size", batch_size, min=1)
    lr = validate.require_real("lr", lr, min=0, min_open=True)
    weight_decay = validate.require_real("weight_decay", weight_decay, min=0)
    warmup_steps = validate.require_int("warmup_steps", warmup_steps, min=0)
    validate.require_str("schedule", schedule, choices=("constant", "cosine"))
    grad_clip = validate.optional(validate.require_real, "grad_clip", grad_clip, min=0, min_open=True)
    validate.optional(validate.require_callable, "eval_fn", eval_fn)
    eval_every = validate.optional(validate.require_int, "eval_every", eval_every, min=1)
    seed = validate.require_int("seed", seed)
    progress = validate.optional(validate.require_bool, "progress", progress)
    validate.require_str("desc", desc, nonempty=False)
    if isinstance(examples, (list, tuple)) and len(examples) == 0:
        raise ValueError("train needs at least one example (examples is empty)")
    vocab, context = validate.model_limits(model)
    pad_id = validate.require_int("pad_id", pad_id, min=0, max=None if vocab is None else vocab - 1)
    examples = validate.require_encoded_examples("examples", examples, vocab_size=vocab, context=context,
                                          supervised=True)
    require_adapters_active(model, "train")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False); "
                         "apply a method (e.g. apply_lora(model)) or unfreeze some with requires_grad_(True)")
    if batch_size > len(examples):  # otherwise every batch would silently be smaller than asked
        raise ValueError(f"batch_size={batch_size} is larger than the {len(examples)} examples; pass "
                         f"batch_size <= {len(examples)}")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = params[0].device
    if optimizer is None:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        validate.require_callable("optimizer", optimizer)
        opt = optimizer(model)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer(model) must return a torch.optim.Optimizer, got {validate.describe(opt)}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup_steps, schedule))
    hist = History(trainable_params=sum(p.numel() for p in params))

    def evaluate(step: int) -> None:
        if eval_fn is not None:
            hist.eval_step.append(step)
            hist.metric.append(validate.require_real("eval_fn(model)'s result", eval_fn(model)))
            model.train()

    model.train()
    evaluate(0)
    order, pos = torch.randperm(len(examples), generator=gen), 0
    start = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc=desc, disable=_quiet() if progress is None else not progress)
    for step in bar:
        if pos + batch_size > len(order):  # new epoch
            order, pos = torch.randperm(len(examples), generator=gen), 0
        idx = order[pos:pos + batch_size].tolist()
        pos += batch_size
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        hist.step.append(step)
        hist.loss.append(loss.item())
        hist.wall_time.append(time.perf_counter() - start)
        if eval_every and step % eval_every == 0 and step != steps:
            evaluate(step)
        bar.set_postfix(loss=f"{hist.loss[-1]:.3f}")
    evaluate(steps)
    model.eval()
    return hist
