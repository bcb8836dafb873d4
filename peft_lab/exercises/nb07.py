"""Exercises of notebook 07 (scale out). Expected answers are computed, not stored: Adam's step by PyTorch's own
AdamW, GPU counts by ``zero_bytes_per_rank`` (equation 07.1), shard sizes by ``fsdp_elements_per_rank`` (torch's
``chunk`` split, what FSDP2 does), the debugged rank loss against the whole batch's gradient."""
from __future__ import annotations

import math

from . import exercise, number, run_student
from .hinted import hinted

ADAM_LR, ADAM_GRAD = 1e-2, 3e-8


def _adam_step(grad: float, eps: float = 1e-8) -> float:
    """How far one step of PyTorch's AdamW (lr ``ADAM_LR``, no weight decay) moves a weight at 0 with ``grad``."""
    import torch
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    w.grad = torch.tensor([grad], dtype=torch.float64)
    torch.optim.AdamW([w], lr=ADAM_LR, weight_decay=0.0, eps=eps).step()
    return abs(w.item())


@exercise("07.ex1", f"Predict, then run: one step of torch.optim.AdamW (lr = {ADAM_LR:g}, PyTorch's default eps = "
                    f"1e-8, no weight decay) from a weight of 0 whose gradient is {ADAM_GRAD:g}. How far does the "
                    "weight move (the absolute value)? Write your prediction before you run the check, which "
                    "takes the step with PyTorch's own AdamW; within 5% counts.", kind="predict",
          hidden=lambda: [f"{_adam_step(ADAM_GRAD):.1e}", f"{_adam_step(ADAM_GRAD):.4f}",
                          f"{_adam_step(ADAM_GRAD):g}"])
def _adam_predict(answer):
    lr, g, eps = ADAM_LR, ADAM_GRAD, 1e-8
    moved = _adam_step(g)
    ok, _ = number(answer, moved, rel_tol=0.05)
    if ok:
        return True, (f"PyTorch's AdamW moved it by {moved:.3g}. On the first step m̂ = g and √v̂ = |g|, so the "
                      f"update is lr·g/(|g| + ε): with |g| = {g:g} not far above ε = {eps:g} the step is "
                      f"{g / (g + eps):.0%} of lr — and a gradient of the opposite sign would move it as far the "
                      "other way.")
    guess = float(answer)
    if math.isclose(-guess, moved, rel_tol=0.05):
        return False, ("right size, and the weight does move down (against the gradient); the question asks how far "
                       "it moves, a distance: give the absolute value.")
    known = {lr: "that is the step for |g| ≫ ε. Here |g| is only a few times ε: where does ε enter Adam's update?",
             lr * g: "that is SGD's step, lr·g. Adam divides the gradient by its own running size first.",
             lr * g / eps: "ε is added to √v̂ (= |g| on the first step), it does not replace it.",
             lr * eps / (g + eps): "that is the sensitivity to a small change of g on the first step, "
                                   "lr·ε/(|g| + ε)², times |g|; the question asks for the step itself."}
    for value, why in known.items():
        if math.isclose(guess, value, rel_tol=0.05):
            return False, f"{why} Try again."
    return False, (f"{guess:g} is {'too high' if guess > moved else 'too low'} (more than 5% off). On the first "
                   "step Adam's moments are m̂ = g and v̂ = g²: write the update lr·m̂/(√v̂ + ε) with those. Try again.")


GPU_GIB, GPU_STAGE = 40, 2


def _gpus_needed(stage: int, budget: float) -> int:
    from ..scale_out import zero_bytes_per_rank
    return next(n for n in range(1, 4096)
                if zero_bytes_per_rank("llama-7b", n, stage, precision="bf16-mixed")["total"] <= budget)


@exercise("07.ex2", f"Full fine-tuning of llama-7b in bf16 mixed precision under ZeRO stage {GPU_STAGE} on GPUs of "
                    f"{GPU_GIB} GiB, counting model states only (weights, gradients, Adam state with the fp32 master "
                    "copy): at least how many GPUs? (A whole number.)", kind="compute",
          hidden=lambda: [f"{_gpus_needed(GPU_STAGE, GPU_GIB * 2**30)} GPUs"])
def _gpus(answer):
    from ..scale_out import zero_bytes_per_rank
    budget = GPU_GIB * 2**30
    need = _gpus_needed(GPU_STAGE, budget)
    if isinstance(answer, float) and not answer.is_integer():
        return False, f"{answer} GPUs: a count of GPUs is a whole number (round up)."
    total = zero_bytes_per_rank("llama-7b", 1, 0, precision="bf16-mixed")["total"]
    mistakes = {need - 1: "so close: round up — with one GPU fewer each holds a little more than its memory."}
    mistakes[_gpus_needed(GPU_STAGE, GPU_GIB * 1e9)] = (f"that counts {GPU_GIB} GB = {GPU_GIB}·10⁹ bytes; a GiB is "
                                                        "2³⁰ bytes, 7% more.")
    mistakes[math.ceil(total / budget)] = ("that divides all the model states among the GPUs, as stage 3 would; "
                                           f"stage {GPU_STAGE} leaves the weights whole on every GPU.")
    mistakes[_gpus_needed(3, budget)] = (f"that is stage 3, where the bf16 weights are sharded too; at stage "
                                         f"{GPU_STAGE} every GPU keeps all of them.")
    mistakes.pop(need, None)
    return hinted(answer, need, rel_tol=1e-9, mistakes=mistakes,
                   explain=f"{need} GPUs: the bf16 weights (2Ψ) stay whole on each, the gradients and the Adam state "
                         "with the master copy (14Ψ) are divided among them.",
                   hint=f"which of the weights, the gradients and the optimizer state does stage {GPU_STAGE} divide "
                        "among the GPUs (07.1)? Write one GPU's bytes as a function of n and solve for n.")


def _models():
    """Small models with odd sizes (so chunks are uneven), built on the meta device, and a plain module."""
    from torch import nn
    from transformers import GPT2Config, LlamaConfig

    from ..models import build_from_config
    gpt2 = GPT2Config(n_layer=2, n_embd=36, n_head=3, vocab_size=101, n_positions=17, bos_token_id=0, eos_token_id=0)
    llama = LlamaConfig(hidden_size=48, intermediate_size=75, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=53, max_position_embeddings=32, bos_token_id=0,
                        eos_token_id=0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to("meta")
    return {"a GPT-2 of width 36, vocabulary 101 (tied head)": build_from_config(gpt2, device="meta"),
            "a LLaMA of width 48 with an MLP of 75": build_from_config(llama, device="meta"),
            "Linear(5, 7) → Linear(7, 3)": mlp}


@exercise("07.ex3", "Write elements_per_rank(model, ranks) -> a list of `ranks` integers: the parameter elements "
                    "each rank holds after FSDP2's fully_shard (every tensor split along dim 0 into chunks of "
                    "ceil(rows / ranks) rows). Pass the function itself.", kind="build", hidden=lambda: [])
def _elements(answer):
    from ..scale_out import fsdp_elements_per_rank
    for name, model in _models().items():
        total = sum(p.numel() for p in model.parameters())
        for ranks in (1, 2, 3, 4, 8):
            expected = fsdp_elements_per_rank(model, ranks)
            got = run_student(answer, model, ranks, forbid=(fsdp_elements_per_rank,))
            try:
                got = [int(g) for g in got]
            except TypeError:
                return False, f"elements_per_rank(<{name}>, {ranks}) returned {got!r}; return a list of integers"
            if got == expected:
                continue
            if len(got) != ranks:
                why = f"return one count per rank ({ranks} numbers)."
            elif sum(got) != total:
                why = (f"the counts add up to {sum(got):,}, the model has {total:,} parameters (a tied head "
                       "counts once: model.parameters() yields it once)." if sum(got) > total else
                       f"the counts add up to {sum(got):,}, the model has {total:,}: every element is on some rank.")
            elif got == [total // ranks + (r < total % ranks) for r in range(ranks)]:
                why = ("an even split of the total is not what FSDP does: each tensor is chunked along its first "
                       "dimension separately, in chunks of ceil(rows / ranks) rows.")
            else:
                why = "chunks of ceil(rows / ranks) rows go to ranks 0, 1, …; the last ones are shorter or empty."
            return False, f"elements_per_rank(<{name}>, {ranks}) returned {got}, FSDP2 holds {expected}: {why}"
    return True, ("torch.chunk's split per tensor: rank r holds min(c, rows − r·c) rows (c = ceil(rows / n), at "
                  "least 0) of every tensor — the first ranks hold a little more than total / n.")


def _rank_gradients(rank_loss, world: int, seed: int):
    """The gradient FSDP applies when each of ``world`` ranks back-propagates ``rank_loss`` on its slice of a batch
    (the mean of the ranks' gradients: FSDP's reduce-scatter averages), and the whole batch's mean-loss gradient."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    B, T, V, d = 2 * world, 6, 11, 5
    x = torch.randn(B, T, d, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    keep = torch.rand(B, T, generator=g) < torch.linspace(0.2, 0.9, B)[:, None]     # uneven answer tokens per row
    keep[:, 0] = True
    labels[~keep] = -100
    W = torch.randn(d, V, generator=g, requires_grad=True)
    whole = F.cross_entropy((x @ W).flatten(0, 1), labels.flatten(), ignore_index=-100)
    want, = torch.autograd.grad(whole, W)
    n_global = int((labels != -100).sum())
    grads = []
    share = B // world
    for r in range(world):
        W_r = W.detach().clone().requires_grad_(True)
        loss = run_student(rank_loss, x[r * share:(r + 1) * share] @ W_r, labels[r * share:(r + 1) * share],
                           n_global, world)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"rank_loss returned {type(loss).__name__}; return the loss as a one-element tensor")
        loss.reshape(()).backward()
        grads.append(W_r.grad)
    return torch.stack(grads).mean(0), want


@exercise("07.ex4", "Debug: rank_loss(logits, labels, n_global, world) is the loss each of `world` ranks "
                    "back-propagates on its slice of the global batch (logits: its rows × T × V, labels already "
                    "shifted, −100 where not supervised; n_global: supervised tokens in the whole global batch). "
                    "FSDP then averages the ranks' gradients. Trained this way, 2 ranks do not follow the run of 1 "
                    "process on the same batches. Find the bug, fix it, and pass the fixed function.", kind="debug",
          hidden=lambda: [])
def _rank_loss(answer):
    import torch
    with torch.random.fork_rng(devices=[]):
        for world, seed in ((1, 70), (2, 71), (3, 72), (4, 73)):
            got, want = _rank_gradients(answer, world, seed)
            if torch.allclose(got, want, rtol=1e-4, atol=1e-6):
                continue
            ratio = (got.norm() / want.norm()).item()
            if math.isclose(ratio, 1 / world, rel_tol=1e-3) and world > 1:
                why = ("the gradients are 1/world of the whole batch's: FSDP averages over the ranks, so each rank's "
                       "loss must be world times its share.")
            elif math.isclose(ratio, world, rel_tol=1e-3) and world > 1:
                why = "the gradients are world times too large: the average over the ranks already divides by world."
            else:
                why = ("the direction differs, not just the size: ranks with fewer supervised tokens weigh as much "
                       "as ranks with more. Each token must count 1 / n_global, whatever rank it is on.")
            return False, f"with {world} rank(s) the averaged gradient differs from the whole batch's: {why}"
    return True, ("each rank sums its tokens' losses and divides by the global count, times world (FSDP's average "
                  "divides by world again): every token weighs 1 / n_global, as in one process. A per-rank mean "
                  "weighs a rank's tokens by 1 / (its own count) — the same bug as gradient accumulation over "
                  "micro-batches with a mean loss.")
