"""What a model does at the verdict, beyond accuracy (notebook 04, "the plateau"; notebook 02's answer format).

Three views of one review task:

* :func:`answer_diagnostics` — teacher-forced on ``prompt + " " + answer + EOS``: accuracy (the larger of the
  two verdict logits, as :func:`peft_lab.evaluate_task`), the loss on the answer token, the loss on the rest of
  the supervised tokens (the end-of-text token), and the good − bad logit spread across inputs. A model that
  has learned the *format* but not the task has a low answer-token loss (it says a verdict word) while its
  spread has the same sign for every input (it always says the same one).
* :func:`verdict_hidden_states` — the frozen model's hidden state at the last prompt token ("verdict:"),
  after the embeddings and after every block.
* :func:`linear_probe` — logistic regression on those states (a few lines of torch): if it reads the verdict
  from a layer's state, the information is there and a method only has to route it to the output.
"""
from __future__ import annotations

import torch

from . import core, validate
from .data import VERDICTS, collate, encode_task


def _verdict_ids(tokenizer) -> list[int]:
    ids = [tokenizer.encode(" " + v) for v in VERDICTS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"each verdict must be one token, got {dict(zip(VERDICTS, ids))}")
    return [i[0] for i in ids]


@torch.no_grad()
def answer_diagnostics(model, tokenizer, examples: list[dict], batch_size: int = 64) -> dict[str, float]:
    """On task rows ``{"prompt", "answer"}``: ``accuracy``; ``answer_loss`` and ``rest_loss`` (mean
    cross-entropy in nats over the full vocabulary, on the answer token and on the other supervised tokens);
    ``choice_loss``, the cross-entropy of the two-way choice good/bad alone (softmax over the two verdict
    logits: an answer that ignores the input cannot go below the labels' entropy, notebook 04 eq. 04.6);
    ``spread_mean`` and ``spread_std`` of the logit difference good − bad at "verdict:" across inputs;
    ``said_good``, the share of inputs on which " good" wins."""
    model = validate.require_module("model", model)
    examples = validate.require_task_rows("examples", examples)
    good, bad = _verdict_ids(tokenizer)
    enc = encode_task(examples, tokenizer)
    device = next(model.parameters()).device
    answer_nll, rest_nll, rest_n, spreads, correct, choice = [], 0.0, 0, [], 0, []
    with core.eval_mode(model):
        for i in range(0, len(enc), batch_size):
            b = {k: v.to(device) for k, v in collate(enc[i:i + batch_size], pad_id=tokenizer.eos_token_id).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            targets = b["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                    ignore_index=validate.IGNORE_INDEX, reduction="none")  # (B, T-1)
            supervised = targets != validate.IGNORE_INDEX
            first = supervised.int().argmax(1)            # the answer token: the first supervised target
            rows = torch.arange(len(first), device=device)
            answer_nll.append(nll[rows, first])
            is_answer = torch.zeros_like(supervised)
            is_answer[rows, first] = True
            rest = supervised & ~is_answer
            rest_nll += nll[rest].sum().item()
            rest_n += int(rest.sum())
            at_verdict = logits[rows, first]              # logits read after "verdict:"
            spread = at_verdict[:, good] - at_verdict[:, bad]
            spreads.append(spread)
            truth = torch.tensor([e["answer"] == VERDICTS[0] for e in examples[i:i + batch_size]], device=device)
            correct += int(((spread > 0) == truth).sum())
            choice.append(torch.nn.functional.softplus(torch.where(truth, -spread, spread)))  # -log p(right | 2 words)
    spread = torch.cat(spreads)
    return {"accuracy": correct / len(enc), "answer_loss": torch.cat(answer_nll).mean().item(),
            "rest_loss": rest_nll / max(rest_n, 1), "choice_loss": torch.cat(choice).mean().item(),
            "spread_mean": spread.mean().item(),
            "spread_std": spread.std().item() if len(spread) > 1 else 0.0,
            "said_good": (spread > 0).float().mean().item()}


@torch.no_grad()
def verdict_hidden_states(model, tokenizer, examples: list[dict], batch_size: int = 64) -> torch.Tensor:
    """Hidden states at each prompt's last token ("verdict:"): ``(layers + 1) × N × d`` — the embeddings
    (entry 0), then the output of every block (transformers' ``output_hidden_states``)."""
    model = validate.require_module("model", model)
    examples = validate.require_task_rows("examples", examples)
    device = next(model.parameters()).device
    enc = [{"input_ids": tokenizer.encode(e["prompt"])} for e in examples]
    out = []
    with core.eval_mode(model):
        for i in range(0, len(enc), batch_size):
            b = collate(enc[i:i + batch_size], pad_id=tokenizer.eos_token_id)
            hs = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                       output_hidden_states=True).hidden_states
            last = (b["attention_mask"].sum(1) - 1).to(device)
            out.append(torch.stack([h[torch.arange(len(last), device=device), last] for h in hs]))
    return torch.cat(out, dim=1).float()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 steps: int = 300, lr: float = 0.1, weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression ``sigmoid(w·x + b)`` fitted to ``(train_x, train_y)``
    (features standardised with the training set's mean and std; full-batch AdamW)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(seed)
    probe = torch.nn.Linear(xtr.shape[1], 1)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(xtr).squeeze(1), train_y.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return ((probe(xte).squeeze(1) > 0) == test_y.bool()).float().mean().item()


@torch.no_grad()
def attention_io(model, layer: int = 0, **inputs) -> dict:
    """Run ``model(**inputs)`` and return what attention block ``layer`` received and returned: ``x`` (its
    hidden-state input), ``rope`` (the rotary ``(cos, sin)`` a LLaMA-style model passes it; None for GPT-2) and
    ``out`` (its output before the residual add) — read by a forward hook, which must accept keyword
    arguments because transformers passes the hidden states positionally in some versions and by name in
    others (notebook 04, eq. 04.1 checked by hand)."""
    from . import arch
    attn, seen = arch.attention(model, layer), {}

    def hook(module, args, kwargs, out):
        seen.update(x=args[0] if args else kwargs["hidden_states"], rope=kwargs.get("position_embeddings"),
                    out=out[0])
    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen
