"""Notebook 08's evidence, run headless: six claims about LoRA in practice, tested on the tiny model.

``python -m peft_lab.benchmarks.what_matters --out notebooks/results/08_what_matters.json [--jobs 2]`` trains
every configuration below and writes one JSON file that notebook 08 draws its figures and verdicts from
(:mod:`peft_lab.benchmarks.what_matters_report` computes the verdicts). The claims (notebook 08, §4–§9):

1. **rate ratio** — LoRA's best rate is ~10× full fine-tuning's (≈15× under 100 steps; Thinking Machines,
   "LoRA Without Regret", 2025) and nearly independent of the rank under α/r; rsLoRA's α/√r moves it.
2. **placement** — LoRA on every linear layer beats attention-only LoRA at matched trainable parameters.
3. **capacity** — low ranks fall behind full fine-tuning when the data asks more than they can hold
   (a memorisation set of random facts built from the corpus lexicon, beside the review task).
4. **batch size** — LoRA tolerates large batches worse than full fine-tuning; a higher rank does not fix it.
5. **the family, tuned fairly** — LoRA+, PiSSA, OLoRA, rsLoRA and DoRA, each at its own tuned rate, land within
   1–2% of plain LoRA ("Learning Rate Matters", arXiv 2602.04998, 2026).
6. **learns less, forgets less** — at matched task accuracy LoRA forgets less than full fine-tuning (Biderman et
   al. 2024): the held-out perplexity of every run of claim 1's sweep against how much it learned.

Every configuration gets a learning-rate grid (a factor ~3 apart on the 1–3–10 ladder); the rate of lowest
validation answer loss is chosen, and a choice at an edge of the grid adds the next rate beyond it (twice at
most; the file says ``"edge": true`` if it still sits there). Claim 1's configurations run every rate on every
seed (so each seed has its own best rate and the forgetting plot has every point three times); the others
choose on seed 0 and then run seeds 1 and 2 at that rate. Each run records its final training loss, the loss
at a few checkpoints, the validation answer loss and accuracy, and the held-out perplexity with the adapter on
(forgetting). Work is spread over ``--jobs`` processes of one thread each (the numbers do not depend on it).
``--smoke`` runs a few steps of a few configurations (seconds).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..corpus import ANIMALS, COLORS, NAMES, OBJECTS, VERDICTS, generate_task
from ..data import collate, encode_task, load_heldout, perplexity
from ..lora import apply_lora, loraplus_optimizer
from ..models import load_base_model
from ..paths import write_text_atomic
from ..train import train
from .head_to_head import _beyond, _cpu_name, _git_commit, _load, _log, _quiet

RESULTS = Path("notebooks") / "results" / "08_what_matters.json"
ALL_LAYERS = ("c_attn", "c_proj", "c_fc")        # GPT-2: every linear layer of every block (attention and MLP)
ATTENTION = ("attn.c_attn", "attn.c_proj")       # GPT-2: attention only (q, k, v and the output projection)
ALPHA = 16                                       # fixed α: the scale is α/r (or α/√r), as in LoRA Without Regret


@dataclass(frozen=True)
class Config:
    """One trained configuration: a method (``"full"`` or ``"lora"`` with its options), a task, a batch size,
    a step budget and its rate grid. ``every_seed``: every rate on every seed (claim 1), else seed 0 chooses."""

    name: str
    claim: str
    grid: tuple[float, ...]
    kind: str = "lora"
    rank: int = 0
    targets: tuple[str, ...] = ALL_LAYERS
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    loraplus_ratio: float | None = None
    task: str = "reviews"
    batch_size: int = 16
    steps: int = 60
    every_seed: bool = False


@dataclass(frozen=True)
class Profile:
    name: str
    configs: tuple[Config, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    n_train: int = 200            # notebook 06's reviews: 200 training, 200 validation, five clauses
    n_val: int = 200
    num_clauses: int = 5
    facts: int = 64               # the capacity claim's memorisation set (number of random facts)
    heldout_n: int = 100
    checkpoints: int = 8
    widen: int = 2
    extra: dict = field(default_factory=dict)


LORA_GRID = (3e-3, 1e-2, 3e-2)
FULL_GRID = (1e-4, 3e-4, 1e-3)
LOW_GRID = (3e-4, 1e-3, 3e-3)   # LoRA+ (A's rate; B's is 16×), PiSSA and OLoRA (their factors start large)
STEPS = 60                  # claims 1, 2, 5: 60 cosine steps of 16 reviews (under 100: "LoRA Without Regret"'s
                            # short-run regime, where it puts the ratio near 15×)
FACT_STEPS = 120            # claim 3: 30 epochs of 64 facts at batch 16


def _full_configs(steps: int = STEPS, fact_steps: int = FACT_STEPS) -> tuple[Config, ...]:
    """The full plan; ``steps`` (reviews) and ``fact_steps`` (facts) scale it for a longer run (``--steps``)."""
    S = steps
    # claim 1: full FT and LoRA r=16 run every rate on every seed (the forgetting claim reads all their runs)
    out = [Config("full FT", "rate", FULL_GRID, kind="full", steps=S, every_seed=True)]
    out += [Config(f"LoRA r={r}", "rate", LORA_GRID, rank=r, steps=S, every_seed=r == 16) for r in (1, 16, 64)]
    # rsLoRA's scale α/√r is √r times α/r: its grid starts lower by about that factor
    out += [Config(f"rsLoRA r={r}", "rate", g, rank=r, use_rslora=True, steps=S)
            for r, g in ((16, (1e-3, 3e-3, 1e-2)), (64, (3e-4, 1e-3, 3e-3)))]
    # placement at matched parameters: attention-only r=8 has 768·8 = 6,144 per block, every layer r=3 has 2,048·3
    out += [Config("attention r=8", "placement", LORA_GRID, rank=8, targets=ATTENTION, steps=S),
            Config("all layers r=3", "placement", LORA_GRID, rank=3, steps=S)]
    # the family at r=16 (plain LoRA and rsLoRA r=16 come from claim 1)
    out += [Config("LoRA+ r=16", "family", LOW_GRID, rank=16, loraplus_ratio=16.0, steps=S),
            Config("PiSSA r=16", "family", LOW_GRID, rank=16, init="pissa", steps=S),
            Config("OLoRA r=16", "family", LOW_GRID, rank=16, init="olora", steps=S),
            Config("DoRA r=16", "family", LORA_GRID, rank=16, use_dora=True, steps=S)]
    # claim 4: batch 64 at the examples seen of batch 16 (which comes from claim 1); a larger batch, larger rates
    big = S * 16 // 64     # batch 64 sees the examples of S steps at batch 16
    out += [Config("full FT bs=64", "batch", (3e-4, 1e-3, 3e-3), kind="full", batch_size=64, steps=big)]
    out += [Config(f"LoRA r={r} bs=64", "batch", (1e-2, 3e-2, 1e-1), rank=r, batch_size=64, steps=big)
            for r in (1, 64)]
    # claim 3: memorising random facts, full FT against the lowest and the highest rank
    out += [Config("facts full FT", "capacity", (1e-3, 3e-3, 1e-2), kind="full", task="facts", steps=fact_steps)]
    out += [Config(f"facts LoRA r={r}", "capacity", (1e-2, 3e-2, 1e-1), rank=r, task="facts", steps=fact_steps)
            for r in (1, 64)]
    return tuple(out)


def _snap(x: float) -> float:
    """A rate to three digits (``_beyond`` works in floating point)."""
    return float(f"{x:.3g}")


FULL = Profile("full", _full_configs())
SMOKE = Profile("smoke", (
    Config("full FT", "rate", (1e-4, 3e-4), kind="full", steps=3, every_seed=True),
    Config("LoRA r=4", "rate", (3e-3, 1e-2), rank=4, steps=3),
    Config("LoRA+ r=16", "family", (3e-4,), rank=16, loraplus_ratio=16.0, steps=3),
    Config("PiSSA r=16", "family", (1e-4,), rank=16, init="pissa", steps=3),
    Config("LoRA r=4 bs=4", "batch", (3e-3,), rank=4, batch_size=4, steps=3),
    Config("facts LoRA r=4", "capacity", (1e-2,), rank=4, task="facts", steps=3),
), seeds=(0, 1), n_train=16, n_val=16, facts=16, heldout_n=8, checkpoints=3, widen=1)
PROFILES = {p.name: p for p in (FULL, SMOKE)}


def make_facts(n: int, seed: int = 808) -> list[dict]:
    """``n`` random facts to memorise, ``{"prompt": "fact: the owl of mia is", "answer": "red"}``: a (name,
    animal or object) pair drawn without repetition from the corpus lexicon and a colour drawn at random, so
    nothing but memory predicts the answer (log₂ 10 ≈ 3.3 bits a fact)."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in NAMES for b in ANIMALS + OBJECTS]
    if n > len(pairs):
        raise ValueError(f"at most {len(pairs)} distinct facts, asked for {n}")
    rng.shuffle(pairs)
    return [{"prompt": f"fact: the {b} of {a} is", "answer": rng.choice(COLORS)} for a, b in pairs[:n]]


@torch.no_grad()
def answer_scores(model, tok, examples: list[dict], choices: tuple[str, ...], batch_size: int = 64) -> dict:
    """Validation answer loss (cross-entropy over the whole vocabulary of the answer token after the prompt,
    nats, as :func:`peft_lab.compare.answer_loss`) and accuracy (the right answer has the largest logit among
    ``choices``, as :func:`peft_lab.data.evaluate_task`), in one pass."""
    ids = torch.tensor([tok.encode(" " + c)[0] for c in choices])
    answer = {c: i for c, i in zip(choices, ids.tolist())}
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(examples), batch_size):
        rows = examples[i:i + batch_size]
        b = collate([{"input_ids": tok.encode(e["prompt"])} for e in rows], tok.eos_token_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        last = logits[torch.arange(len(rows)), b["attention_mask"].sum(1) - 1]
        target = torch.tensor([answer[e["answer"]] for e in rows])
        loss += torch.nn.functional.cross_entropy(last, target, reduction="sum").item()
        pred = ids[last[:, ids].argmax(-1)]
        correct += int((pred == target).sum())
    return {"val_loss": loss / len(examples), "val_acc": correct / len(examples)}


class _Setting:
    """The base model, the tasks and the held-out text, loaded once per process."""

    def __init__(self, p: Profile):
        self.base, self.tok = load_base_model("tiny", device="cpu")
        reviews = generate_task(p.n_train, seed=501, num_clauses=p.num_clauses)
        self.tasks = {"reviews": (encode_task(reviews, self.tok),
                                  generate_task(p.n_val, seed=502, num_clauses=p.num_clauses), VERDICTS)}
        facts = make_facts(p.facts)   # memorisation: the facts are both what is trained and what is scored
        self.tasks["facts"] = (encode_task(facts, self.tok), facts, tuple(COLORS))
        self.heldout = load_heldout(p.heldout_n)


def build(c: Config, base):
    """A fresh copy of ``base`` carrying configuration ``c`` (full fine-tuning: the copy itself)."""
    model = copy.deepcopy(base)
    if c.kind == "lora":
        apply_lora(model, rank=c.rank, alpha=ALPHA, target_modules=list(c.targets), use_rslora=c.use_rslora,
                   use_dora=c.use_dora, init=c.init)
    return model


def _checkpoints(losses: list[float], k: int) -> tuple[list[int], list[float]]:
    """The training loss averaged over ``k`` equal windows, each labelled by its last step."""
    n = len(losses)
    edges = [round(n * j / k) for j in range(k + 1)]
    return ([edges[j + 1] for j in range(k)],
            [round(sum(losses[edges[j]:edges[j + 1]]) / max(1, edges[j + 1] - edges[j]), 4) for j in range(k)])


def train_one(s: _Setting, p: Profile, c: Config, lr: float, seed: int) -> dict:
    """One run: configuration ``c`` at rate ``lr`` and ``seed``; what it learned and how much it forgot."""
    train_set, val, choices = s.tasks[c.task]
    torch.manual_seed(seed)   # LoRA's random A (and DoRA's) follow the seed
    model = build(c, s.base)
    opt = (lambda m: loraplus_optimizer(m, lr=lr, ratio=c.loraplus_ratio)) if c.loraplus_ratio else None
    h = train(model, train_set, steps=c.steps, batch_size=c.batch_size, lr=lr, schedule="cosine", seed=seed,
              pad_id=s.tok.eos_token_id, progress=False, optimizer=opt)
    tail = max(1, c.steps // 10)
    at, curve = _checkpoints(h.loss, p.checkpoints)
    rec = {"lr": lr, "seed": seed, "train_loss": round(sum(h.loss[-tail:]) / tail, 4),
           "loss_steps": at, "loss_curve": curve,
           **{k: round(v, 5) for k, v in answer_scores(model, s.tok, val, choices).items()},
           "ppl": round(perplexity(model, s.tok, s.heldout), 4), "train_s": round(h.seconds, 1)}
    if not math.isfinite(rec["ppl"]):
        rec["ppl"] = None
    _log(f"{c.name:>18} lr {lr:g} seed {seed}: loss {rec['train_loss']:.3f}, val {rec['val_acc']:.1%} "
         f"/ {rec['val_loss']:.3f}, ppl {rec['ppl']}, {rec['train_s']:.0f} s")
    return rec


def _mean_loss(runs: list[dict], lr: float) -> float:
    vals = [r["val_loss"] for r in runs if r["lr"] == lr]
    return sum(vals) / len(vals)


def sweep(s: _Setting, p: Profile, c: Config) -> dict:
    """Configuration ``c``'s grid, widened past an edge while the choice sits on it, then its seeds. With
    ``every_seed`` each rate runs on every seed and the choice is the lowest mean validation loss; otherwise
    seed 0 chooses and the other seeds run at the chosen rate."""
    seeds = p.seeds if c.every_seed else p.seeds[:1]
    runs = [train_one(s, p, c, lr, sd) for lr in c.grid for sd in seeds]
    added: list[float] = []

    def choose():
        rates = sorted({r["lr"] for r in runs})
        best = min(rates, key=lambda lr: _mean_loss(runs, lr))
        return best, len(rates) > 1 and best in (rates[0], rates[-1])

    chosen, edge = choose()
    while edge and len(added) < p.widen:
        rates = sorted({r["lr"] for r in runs})
        lr = _snap(_beyond(rates, low=chosen == rates[0]))
        added.append(lr)
        _log(f"{c.name:>18}: best rate {chosen:g} at the edge of {rates}; adding {lr:g}")
        runs += [train_one(s, p, c, lr, sd) for sd in seeds]
        chosen, edge = choose()
    if not c.every_seed:
        runs += [train_one(s, p, c, chosen, sd) for sd in p.seeds[1:]]
    runs.sort(key=lambda r: (r["lr"], r["seed"]))
    out = {"config": asdict(c), "lrs": sorted({r["lr"] for r in runs}), "widened": added, "chosen_lr": chosen,
           "edge": edge, "runs": runs}
    if c.every_seed:   # each seed's own best rate
        out["best_lr_per_seed"] = {str(sd): min((r for r in runs if r["seed"] == sd), key=lambda r: r["val_loss"])["lr"]
                                   for sd in p.seeds}
    return out


_SETTING: dict[str, _Setting] = {}


def _profile(name: str, steps: tuple[int, int] | None) -> Profile:
    return FULL if name == "full" and steps in (None, (STEPS, FACT_STEPS)) else (
        Profile("full", _full_configs(*steps)) if name == "full" else PROFILES[name])


def _work(job: tuple[str, str, tuple[int, int] | None]) -> tuple[str, dict]:
    """Worker: one configuration's sweep in this process, one thread."""
    profile, name, steps = job
    torch.set_num_threads(1)
    _quiet()
    p = _profile(profile, steps)
    if profile not in _SETTING:
        _SETTING[profile] = _Setting(p)
    c = next(c for c in p.configs if c.name == name)
    return name, sweep(_SETTING[profile], p, c)


def _cost(c: Config) -> float:
    """A rough relative cost, to start the longest sweeps first."""
    per_step = {"full": 1.3}.get(c.kind, 1.0) * (1.6 if c.use_dora else 1.0) * (c.batch_size / 16) ** 0.8
    return per_step * c.steps * len(c.grid) * (3 if c.every_seed else 1.5)


def environment(argv: list[str]) -> dict:
    import peft
    import transformers
    return {"command": "python -m peft_lab.benchmarks.what_matters " + " ".join(argv),
            "commit": _git_commit(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "threads": 1,
            "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs", "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": _load()}


def run_profile(p: Profile, argv: list[str], out: Path | None, jobs: int = 1) -> dict:
    """Every configuration of ``p`` over ``jobs`` processes; the file is rewritten after each one, so a stopped
    run leaves what it did (``"complete": false``)."""
    start = time.time()
    torch.set_num_threads(1)
    res = {"environment": {**environment(argv), "jobs": jobs}, "complete": False,
           "setting": {k: v for k, v in asdict(p).items() if k not in ("configs", "extra")},
           "alpha": ALPHA,
           "criterion": "lowest validation answer loss (mean over seeds where every seed runs every rate)",
           "configs": [c.name for c in p.configs], "sweeps": {}}
    save = (lambda: write_text_atomic(out, json.dumps(res, indent=1) + "\n")) if out else (lambda: None)
    s = _Setting(p)
    res["base"] = {"heldout_ppl": round(perplexity(s.base, s.tok, s.heldout), 4),
                   **{t: answer_scores(s.base, s.tok, v, ch) for t, (_, v, ch) in s.tasks.items()}}
    steps = (p.configs[0].steps, next(c.steps for c in p.configs if c.task == "facts")) if p.name == "full" else None
    jobs_list = [(p.name, c.name, steps) for c in sorted(p.configs, key=lambda c: -_cost(c))]
    done: dict[str, dict] = {}

    def collect(item: tuple[str, dict]) -> None:
        done[item[0]] = item[1]
        res["sweeps"] = {c.name: done[c.name] for c in p.configs if c.name in done}
        save()

    if jobs == 1:
        _SETTING[p.name] = s
        for job in jobs_list:
            collect(_work(job))
    else:  # spawn, not fork (as head_to_head): a forked torch process can deadlock in its thread pools
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            for item in pool.imap_unordered(_work, jobs_list):
                collect(item)
    res["environment"].update(minutes=round((time.time() - start) / 60, 1), load_end=_load())
    res["complete"] = True
    save()
    _log(f"done in {res['environment']['minutes']} min")
    return res


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"write the results here (e.g. {RESULTS})")
    ap.add_argument("--smoke", action="store_true", help="a few steps of a few configurations: the plumbing")
    ap.add_argument("--jobs", type=int, default=None,
                    help="processes of one thread each (default: one per CPU); the numbers do not depend on it")
    ap.add_argument("--steps", type=int, nargs="+", default=None, metavar="N",
                    help=f"the reviews' step budget (default {STEPS}) and the facts' (default twice it): a longer "
                         "run of the same plan, for an idle machine")
    args = ap.parse_args(argv)
    _quiet()
    p = SMOKE if args.smoke else FULL if args.steps is None else Profile(
        "full", _full_configs(args.steps[0], args.steps[1] if len(args.steps) > 1 else 2 * args.steps[0]))
    jobs = args.jobs or max(1, min(os.cpu_count() or 1, len(p.configs)))
    run_profile(p, argv, args.out, jobs)


if __name__ == "__main__":
    main()
