"""Training one adapter on several processes with FSDP, shown on CPU ranks (notebook 07, "Scale out").

``python -m peft_lab.scale_out --nproc 2 --method lora --steps 4 --seed 0 --out run/`` starts two CPU
processes ("ranks"), shards the model over them with PyTorch's FSDP2 (:func:`torch.distributed.fsdp.fully_shard`,
one unit per transformer block plus the root; gloo backend), trains on the review task and writes
``run/adapter`` (PEFT's format: :func:`peft_lab.import_peft_adapter` and ``peft.PeftModel.from_pretrained``
read it; ``--method full`` writes a model folder ``run/model`` instead) and ``run/report.json`` (per rank the
bytes of parameters, gradients and optimizer state it holds, step times, the loss).

**Launcher: torch's own, not Accelerate.** The ranks are started by :mod:`torch.distributed.run`'s Python
entry (``elastic_launch``, what ``torchrun`` calls), rendezvous ``localhost:0`` so every launch picks a free
port. Accelerate 1.15 cannot drive FSDP on CPU ranks: ``accelerate launch`` refuses ``--cpu`` together with
``--use_fsdp`` ("You can only use one of ..."), and ``AcceleratorState`` sets ``DistributedType.FSDP`` only in
its branch for accelerator back ends (CUDA, XPU, NPU, …), not for ``MULTI_CPU``, where a model is replicated
(DDP) — which would show nothing about sharding. On GPUs Accelerate is the easy way: the configs below.

**What is the same for every N.** Every rank builds the same model from the same seed (FSDP2 does not
broadcast weights: identical seeding is what makes the shards agree), draws the same global batch of
``batch_size`` examples in the order :func:`peft_lab.train` uses, and takes its contiguous slice of
``batch_size / N`` rows. The loss of a rank is its *sum* of answer-token losses times ``N`` divided by the
global number of answer tokens; FSDP's reduce-scatter averages gradients over ranks, so the update is the
gradient of the global mean loss — what one process computes on the whole batch. ``--nproc 1`` is the
reference: the same code path (FSDP with a world of one), so the only difference between N = 1 and N = 2 is
the order of the float32 sums (rank-local sums, then the reduction). With ``--optimizer sgd`` the weights
then agree within float32 reordering (tests/test_scale_out.py). With AdamW (the default) the loss curves do,
but the weights need not: Adam's first updates are ≈ ``lr·sign(g)``, so a gradient entry within rounding of 0
whose sign flips with the order of the sum moves its weight by up to ``2·lr`` — splitting the same batch in
two inside one process does the same.

**Methods.** LoRA, bottleneck adapters (Pfeiffer; written with :func:`peft_lab.save_adapters` to
``adapters.safetensors``, as PEFT has no bottleneck adapters), IA3, DoRA and full fine-tuning shard as they are.
QLoRA (``quantize_model`` then LoRA) runs, but ``fully_shard`` shards parameters only: the packed NF4 weights are
buffers here and stay whole on every rank (``local_bytes``' ``buffer_bytes``). Sharding a 4-bit base needs the
packed weights as parameters of one storage dtype (bitsandbytes' ``bnb_4bit_quant_storage``; notebook 07 §4). Prefix
tuning runs too (written in PEFT's format): the prefix encoder is a small module in the root unit, gathered
with the embeddings, and its keys/values enter each block as an input; nothing of it is cached across steps
(the ``DynamicCache`` is rebuilt in every forward pass), so sharding changes nothing for it. Its weights after
4 AdamW steps on 2 ranks were within 0.3–2.4× the reordering bound of 1 rank's (the AdamW caveat above).

**The arithmetic** (:func:`zero_bytes_per_rank`, :func:`communication_per_step`) reuses
:func:`peft_lab.estimate_memory`'s bytes per parameter and splits them as ZeRO does (Rajbhandari et al. 2020,
§5): stage 1 shards the optimizer state (Adam moments and the fp32 master copy), stage 2 also the
gradients (FSDP ``SHARD_GRAD_OP``), stage 3 also the parameters (FSDP ``FULL_SHARD``, what ``fully_shard``
does). With LoRA the gradients and optimizer state are already a fraction of a percent of the model: the
frozen base, which only stage 3 shards, is what the ranks have to split.

**On GPUs.** ``peft_lab/configs/`` holds an Accelerate config for FSDP2 (bf16, full shard) and one for
DeepSpeed ZeRO-3 (``deepspeed_zero3.json``); :func:`train_with_accelerate` runs the same task, method and loss
under either. From the repository root, with ``num_processes`` in the YAML set to the number of GPUs::

    accelerate launch --config_file peft_lab/configs/accelerate_fsdp_lora.yaml \
        -m peft_lab.scale_out --accelerate --method lora --model gpt2 --steps 200 --out runs/fsdp
    accelerate launch --config_file peft_lab/configs/accelerate_deepspeed_zero3.yaml \
        -m peft_lab.scale_out --accelerate --method lora --model gpt2 --steps 200 --out runs/zero3

(DeepSpeed needs ``pip install deepspeed``.) The configs live in the package so that an installed
``peft_lab`` carries them next to the code that reads them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import validate

__all__ = ["METHODS", "OPTIMIZERS", "LEARNING_RATES", "ZERO_STAGES", "Job", "launch", "scale_out",
           "train_with_accelerate", "local_bytes", "shard_rows",
           "fsdp_elements_per_rank", "zero_bytes_per_rank", "communication_per_step", "main"]

METHODS = ("lora", "adapters", "prefix", "ia3", "dora", "qlora", "full")
OPTIMIZERS = ("adamw", "sgd")
#: Learning rates by method: notebook 06's grids around what notebooks 01–04 found (full FT needs ~10× less).
LEARNING_RATES = {"lora": 1e-2, "adapters": 1e-2, "prefix": 1e-2, "ia3": 1e-2, "dora": 1e-2, "qlora": 1e-2,
                  "full": 1e-3}


@dataclass(frozen=True)
class Job:
    """One training run on the ranks of one launch (see the module docstring for what each field means)."""

    method: str = "lora"
    steps: int = 4
    seed: int = 0
    batch_size: int = 8
    lr: float | None = None          # None: LEARNING_RATES[method]
    examples: int = 64               # the first n training reviews
    grad_clip: float | None = 1.0
    optimizer: str = "adamw"         # "sgd": an update linear in the gradient (see the tests' comparison)
    model: str = "tiny"
    out: str | None = None           # folder for adapter/ (or model/) and report.json; None writes nothing

    def checked(self, nproc: int) -> "Job":
        validate.require_str("method", self.method, choices=METHODS)
        steps = validate.require_int("steps", self.steps, min=1)
        seed = validate.require_int("seed", self.seed)
        batch = validate.require_int("batch_size", self.batch_size, min=1)
        examples = validate.require_int("examples", self.examples, min=1)
        if batch % nproc:
            raise ValueError(f"batch_size={batch} does not split over nproc={nproc} ranks; pass a multiple of "
                             f"{nproc} (every rank takes batch_size / nproc rows of each global batch)")
        if batch > examples:
            raise ValueError(f"batch_size={batch} is larger than the {examples} examples; pass batch_size <= "
                             f"{examples}")
        lr = LEARNING_RATES[self.method] if self.lr is None else validate.require_real("lr", self.lr, min=0,
                                                                                          min_open=True)
        clip = validate.optional(validate.require_real, "grad_clip", self.grad_clip, min=0, min_open=True)
        validate.require_str("optimizer", self.optimizer, choices=OPTIMIZERS)
        validate.require_str("model", self.model)
        out = None if self.out is None else validate.require_path("out", self.out)
        if out is not None and out.exists() and not out.is_dir():
            raise FileExistsError(f"out={str(self.out)!r} is an existing file; pass a folder (created if missing)")
        out = None if out is None else str(out)
        return Job(self.method, steps, seed, batch, lr, examples, clip, self.optimizer, self.model, out)


# ----------------------------------------------------------------------------------------------------------
# One rank
# ----------------------------------------------------------------------------------------------------------

def _build(job: Job):
    """The base model with the method applied, identically on every rank (seeded before anything random)."""
    from .models import load_base_model
    torch.manual_seed(job.seed)
    model, tok = load_base_model(job.model, device="cpu")
    if job.method == "lora":
        from .lora import apply_lora
        model = apply_lora(model, rank=8, alpha=16)
    elif job.method == "adapters":
        from .adapters import apply_adapters
        model = apply_adapters(model, placement="pfeiffer", bottleneck_dim=16)
    elif job.method == "prefix":
        from .prefix import apply_prefix_tuning
        model = apply_prefix_tuning(model, num_virtual_tokens=10, projection_dim=64)
    elif job.method == "ia3":
        from .ia3 import apply_ia3
        model = apply_ia3(model)
    elif job.method == "dora":
        from .lora import apply_lora
        model = apply_lora(model, rank=8, alpha=16, use_dora=True)
    elif job.method == "qlora":  # NF4 base (buffers: FSDP2 shards parameters only, see local_bytes), then LoRA
        from .lora import apply_lora
        from .qlora import quantize_model
        model = apply_lora(quantize_model(model), rank=8, alpha=16)
    return model, tok


def _hf_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _shard(model: nn.Module) -> nn.Module:
    """FSDP2: one unit per transformer block, then the root (embeddings, final norm, head, a prefix encoder)."""
    from torch.distributed.fsdp import fully_shard

    from .arch import blocks
    for block in blocks(_hf_model(model)):
        fully_shard(block)
    fully_shard(model)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded) tensor this rank holds: a DTensor's local shard, else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this process holds of ``model``'s parameters and gradients and of ``optimizer``'s state.

    Sharded tensors (FSDP2's DTensors) count their local shard only; ``buffer_bytes`` are the module buffers,
    which ``fully_shard`` leaves whole on every rank (the packed 4-bit weights of :mod:`peft_lab.qlora`).
    ``optimizer_bytes`` are the Adam moments (``exp_avg``, ``exp_avg_sq``), the part ZeRO shards;
    ``optimizer_step_bytes`` are AdamW's per-tensor step counters (one float each, replicated on every rank)."""
    out = {"parameter_bytes": 0, "gradient_bytes": 0, "optimizer_bytes": 0, "optimizer_step_bytes": 0,
           "parameter_elements": 0, "buffer_bytes": 0}
    for b in model.buffers():  # not sharded by FSDP2: e.g. the packed NF4 weights of a quantized base
        local = _local(b)
        out["buffer_bytes"] += local.numel() * local.element_size()
    for p in model.parameters():
        local = _local(p)
        out["parameter_bytes"] += local.numel() * local.element_size()
        out["parameter_elements"] += local.numel()
        if p.grad is not None:
            g = _local(p.grad)
            out["gradient_bytes"] += g.numel() * g.element_size()
    for state in (optimizer.state.values() if optimizer is not None else ()):
        for key, t in state.items():
            if isinstance(t, torch.Tensor):
                t = _local(t)
                out["optimizer_step_bytes" if key == "step" else "optimizer_bytes"] += t.numel() * t.element_size()
    return out


def _loss_sum(model: nn.Module, batch: dict) -> torch.Tensor:
    """Summed cross-entropy of the supervised (answer) tokens of ``batch`` (next-token targets)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


def _batches(n: int, job: Job):
    """The global batches in :func:`peft_lab.train`'s order: a seeded permutation, reshuffled each epoch."""
    gen = torch.Generator().manual_seed(job.seed)
    order, pos = torch.randperm(n, generator=gen), 0
    for _ in range(job.steps):
        if pos + job.batch_size > len(order):
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos:pos + job.batch_size].tolist()
        pos += job.batch_size


def _global_count(rows: list[dict]) -> int:
    """Supervised (answer) tokens of a whole global batch: every rank knows the batch, so no collective."""
    return sum(sum(1 for t in row["labels"][1:] if t != -100) for row in rows)


def _optimizer(job: Job, params: list) -> torch.optim.Optimizer:
    return (torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0) if job.optimizer == "adamw"
            else torch.optim.SGD(params, lr=job.lr))


class _CollectiveCounter:
    """Counts FSDP2's all-gathers and reduce-scatters (calls and full tensor bytes) while active.

    FSDP2 calls its collectives through the ``torch.distributed`` module — ``all_gather_single`` /
    ``reduce_scatter_single`` in recent torch, ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` in older
    releases (2.6), with the same argument order — so wrapping the two attributes its collectives module names
    sees every collective it issues; the wrapped call is the original.
    """

    def __init__(self):
        import inspect

        import torch.distributed as dist
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives
        source = inspect.getsource(_fsdp_collectives)
        pick = lambda new, old: new if f"dist.{new}(" in source else old
        self.names = {"all_gather": pick("all_gather_single", "all_gather_into_tensor"),
                      "reduce_scatter": pick("reduce_scatter_single", "reduce_scatter_tensor")}
        self.dist, self.counts, self.active = dist, {"all_gathers": 0, "all_gather_bytes": 0,
                                                     "reduce_scatters": 0, "reduce_scatter_bytes": 0}, False
        self.originals = {name: getattr(dist, name) for name in self.names.values()}

    def _wrap(self, name: str, kind: str, full_arg: int, full_name: str):
        original = self.originals[name]

        def counted(*args, **kwargs):
            if self.active:
                # the gathered output / the reduce-scatter input: the whole unit
                full = args[full_arg] if len(args) > full_arg else kwargs[full_name]
                self.counts[kind + "s"] += 1
                self.counts[kind + "_bytes"] += full.numel() * full.element_size()
            return original(*args, **kwargs)
        return counted

    def __enter__(self):
        gather, scatter = self.names["all_gather"], self.names["reduce_scatter"]
        setattr(self.dist, gather, self._wrap(gather, "all_gather", 0, "output_tensor"))
        setattr(self.dist, scatter, self._wrap(scatter, "reduce_scatter", 1, "input"))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(self.dist, name, fn)


def _run_job(job: Job, rank: int, world: int) -> dict:
    with _CollectiveCounter() as counter:
        return _train_rank(job, rank, world, counter)


def _train_rank(job: Job, rank: int, world: int, counter: _CollectiveCounter) -> dict:
    import torch.distributed as dist

    from .data import collate, encode_task, load_task

    model, tok = _build(job)
    total_elements = sum(p.numel() for p in model.parameters())
    trainable_elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _shard(model)
    examples = encode_task(load_task("train", n=job.examples), tok)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(job, params)
    pad = tok.eos_token_id
    share = job.batch_size // world
    losses, times = [], []
    model.train()
    for step, idx in enumerate(_batches(len(examples), job)):
        counter.active = step == job.steps - 1  # count one step after the first (lazy init is behind us)
        start = time.perf_counter()
        rows = [examples[i] for i in idx]
        n_global = _global_count(rows)
        mine = collate(rows[rank * share:(rank + 1) * share], pad)
        loss_sum = _loss_sum(model, mine)
        # FSDP averages gradients over the ranks: × world makes the average the gradient of sum/n_global
        (loss_sum * world / n_global).backward()
        if job.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, job.grad_clip)
        opt.step()
        counter.active = False
        times.append(time.perf_counter() - start)
        held = local_bytes(model, opt)  # gradients still held: measured before zero_grad frees them
        opt.zero_grad(set_to_none=True)
        total = loss_sum.detach().clone()
        if world > 1:
            dist.all_reduce(total)  # for the report only: the global mean loss of this step
        losses.append(total.item() / n_global)
    report = {"rank": rank, "world_size": world, **held, "step_seconds": times, "losses": losses,
              "final_loss": losses[-1], "collectives_last_step": dict(counter.counts), "total_elements": total_elements,
              "trainable_elements": trainable_elements}
    _gather_and_save(model, job, rank)
    return report


def _gather_and_save(model: nn.Module, job: Job, rank: int) -> None:
    """Collect the full (unsharded) weights on rank 0 and write them in the method's on-disk format."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0 or job.out is None:
        return
    _save(full, job)


def _save(full: dict, job: Job) -> None:
    fresh, tok = _build(job)                     # an unsharded twin of the model, then the trained weights
    fresh.load_state_dict(full)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    if job.method == "full":
        fresh.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
    elif job.method == "adapters":  # PEFT has no bottleneck adapters: peft_lab's own file (notebook 03)
        from .adapters import save_adapters
        save_adapters(fresh, out / "adapters.safetensors")
    else:
        from .interop import export_peft_adapter
        export_peft_adapter(fresh, out / "adapter")


def _worker(jobs: list[dict]) -> list[dict]:
    """The entry point of every rank: join the process group, run each job, leave."""
    from torch.distributed.elastic.multiprocessing.errors import record
    return record(_rank_main)(jobs)


def _rank_main(jobs: list[dict]) -> list[dict]:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        return [_run_job(Job(**job), rank, world) for job in jobs]
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# The launcher
# ----------------------------------------------------------------------------------------------------------

def _warm_imports(jobs: list[Job]) -> None:
    """Import what building the models imports lazily (transformers' model classes, tokenizers), so that
    forked ranks inherit it instead of importing it each (seconds per rank on a busy 2-core machine)."""
    from .models import load_base_model
    for name in {job.model for job in jobs}:
        try:
            load_base_model(name, device="cpu")
        except (OSError, ValueError):  # a rank reports the same error with its context
            pass


def launch(jobs: list[Job], nproc: int, start_method: str | None = None) -> list[dict]:
    """Run ``jobs`` one after another on ``nproc`` fresh CPU processes (one launch: processes start once).

    ``start_method``: ``"fork"`` (default on Linux: the ranks inherit this process's imports, ~1 s to
    start instead of ~10 s) or ``"spawn"`` (default elsewhere; fresh interpreters, which import
    ``peft_lab`` again — a script that calls this needs the ``if __name__ == "__main__":`` guard).
    Returns one report per job (see :func:`scale_out`), also written to ``job.out/report.json`` when set.
    """
    start_method = start_method or ("fork" if sys.platform == "linux" else "spawn")
    validate.require_str("start_method", start_method, choices=("fork", "spawn"))
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    nproc = validate.require_int("nproc", nproc, min=1, max=64)
    if not jobs:
        raise ValueError("launch needs at least one Job")
    jobs = [job.checked(nproc) for job in jobs]
    if start_method == "fork":
        _warm_imports(jobs)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          start_method=start_method, monitor_interval=0.1)
    results = elastic_launch(config, _worker)([asdict(job) for job in jobs])
    reports = []
    for i, job in enumerate(jobs):
        ranks = [results[r][i] for r in range(nproc)]
        report = {"job": asdict(job), "nproc": nproc, "launcher": "torch.distributed.launcher.elastic_launch",
                  "sharding": "FSDP2 fully_shard per block + root (FULL_SHARD)", "ranks": ranks,
                  "final_loss": ranks[0]["final_loss"]}
        if job.out is not None:
            path = Path(job.out) / "report.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")
        reports.append(report)
    return reports


def scale_out(nproc: int = 2, method: str = "lora", steps: int = 4, seed: int = 0, out=None, **kw) -> dict:
    """Train ``method`` on ``nproc`` CPU ranks sharded with FSDP2; return the report (module docstring)."""
    return launch([Job(method=method, steps=steps, seed=seed, out=None if out is None else str(out), **kw)],
                  nproc)[0]


def train_with_accelerate(job: Job) -> dict:
    """The same training through 🤗 Accelerate, for GPUs: run under ``accelerate launch`` with a config of
    ``peft_lab/configs/`` (FSDP2 or DeepSpeed ZeRO-3 as the config says; see the module docstring).

    Accelerate shards at ``prepare`` (its FSDP2 wrap policy: the model's ``_no_split_modules`` blocks, then the
    root) and reduces gradients as the engine does (an average over ranks), so the loss is scaled exactly as
    in :func:`_train_rank`. Without a config it runs in one plain process (how the tests check it on CPU).
    Returns rank 0's report: final loss, step times, and the bytes this rank holds.
    """
    from accelerate import Accelerator
    acc = Accelerator()
    rank, world = acc.process_index, acc.num_processes
    job = job.checked(world)
    from .data import collate, encode_task, load_task
    model, tok = _build(job)
    opt = _optimizer(job, [p for p in model.parameters() if p.requires_grad])
    share = job.batch_size // world
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None:  # no dataloader is prepared, so DeepSpeed's "auto" batch sizes are filled here
        ds.deepspeed_config.update(train_micro_batch_size_per_gpu=share, train_batch_size=job.batch_size)
    model, opt = acc.prepare(model, opt)
    examples = encode_task(load_task("train", n=job.examples), tok)
    losses, times = [], []
    model.train()
    for idx in _batches(len(examples), job):
        start = time.perf_counter()
        rows = [examples[i] for i in idx]
        n_global = _global_count(rows)
        mine = {k: v.to(acc.device) for k, v in collate(rows[rank * share:(rank + 1) * share],
                                                        tok.eos_token_id).items()}
        loss_sum = _loss_sum(model, mine)
        acc.backward(loss_sum * world / n_global)
        if job.grad_clip is not None:
            acc.clip_grad_norm_(model.parameters(), job.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(acc.reduce(loss_sum.detach(), "sum").item() / n_global)
    held = local_bytes(model, opt)
    full = acc.get_state_dict(model)
    if acc.is_main_process and job.out is not None:
        _save({k: v.float().cpu() for k, v in full.items()}, job)
    acc.wait_for_everyone()
    report = {"job": asdict(job), "nproc": world, "launcher": "accelerate", "distributed_type":
              str(acc.distributed_type), "ranks": [{"rank": rank, **held, "step_seconds": times,
                                                     "losses": losses, "final_loss": losses[-1]}],
              "final_loss": losses[-1]}
    if acc.is_main_process and job.out is not None:
        (Path(job.out) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    acc.end_training()
    return report


# ----------------------------------------------------------------------------------------------------------
# The arithmetic (notebook 07, "What each rank holds" and "What it costs")
# ----------------------------------------------------------------------------------------------------------

#: What each ZeRO stage shards (Rajbhandari et al. 2020, §5.1–5.3, P_os, P_os+g, P_os+g+p); FSDP's
#: ``SHARD_GRAD_OP`` is stage 2 and ``FULL_SHARD`` (FSDP2's ``fully_shard``) stage 3.
ZERO_STAGES = {0: (), 1: ("optimizer",), 2: ("optimizer", "gradients"), 3: ("optimizer", "gradients", "parameters")}


def shard_rows(rows: int, ranks: int, rank: int) -> int:
    """Rows of a dim-0 length ``rows`` that ``rank`` holds when FSDP2 shards over ``ranks``: ``torch.chunk``'s
    split, chunks of ``ceil(rows / ranks)`` with the last ones shorter or empty."""
    chunk = -(-rows // ranks)
    return max(0, min(chunk, rows - rank * chunk))


def fsdp_elements_per_rank(model: nn.Module, ranks: int) -> list[int]:
    """Parameter elements each rank holds after ``fully_shard`` over ``ranks`` (dim-0 chunks of every tensor,
    tied tensors once): the exact count, where ``total / ranks`` is the ideal one."""
    ranks = validate.require_int("ranks", ranks, min=1)
    out = [0] * ranks
    for p in validate.require_module("model", model).parameters():
        row = p[0].numel() if p.dim() else 1
        for r in range(ranks):
            out[r] += shard_rows(p.shape[0] if p.dim() else 1, ranks, r) * row
    return out


def _states(arch, trainable_params, precision, method) -> dict[str, float]:
    """Model states of one AdamW step, split as ZeRO shards them: the working copy of the weights, the
    gradients, and the optimizer's share (Adam moments + the fp32 master copy, ZeRO's K = 12 for mixed
    precision). From :func:`peft_lab.estimate_memory` with ``batch_size=0``; the master copy is taken out of its
    ``parameters`` with the same table (:data:`peft_lab.estimate.PRECISIONS`)."""
    from .estimate import PRECISIONS, QUANTIZED_BASE, estimate_memory
    est = estimate_memory(arch, trainable_params=trainable_params, batch_size=0, precision=precision,
                          method=method)
    per = PRECISIONS.get(precision) or QUANTIZED_BASE[precision]
    trained = est["gradients"] // per["grad"]
    master = per["master"] * trained
    return {"parameters": est["parameters"] - master, "gradients": est["gradients"],
            "optimizer": est["optimizer"] + master}


def zero_bytes_per_rank(arch, ranks: int, stage: int = 3, *, method: dict | None = None,
                        trainable_params: int | None = None, precision: str = "fp32") -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state one of ``ranks`` processes holds under ZeRO
    ``stage`` (0 = plain data parallel, 3 = FSDP ``FULL_SHARD``): a sharded state is divided by ``ranks``,
    the others are held whole on every rank.

    ``arch``, ``method``, ``trainable_params`` and ``precision`` are :func:`peft_lab.estimate_memory`'s (full
    fine-tuning when ``method`` is None; LoRA with ``precision="4bit-base"`` is QLoRA). The figures are ideal
    (FSDP pads dim-0 chunks: :func:`fsdp_elements_per_rank` is exact) and at rest: under stage 3 a rank
    holds one unit's gathered weights on top while it computes, under stage 2 (``SHARD_GRAD_OP``) all of
    them from the forward pass to the end of the backward pass.
    """
    ranks = validate.require_int("ranks", ranks, min=1)
    if stage not in ZERO_STAGES:
        raise ValueError(f"stage must be one of {sorted(ZERO_STAGES)} (ZeRO 1–3; 0 = no sharding), got {stage!r}")
    states = _states(arch, trainable_params, precision, method)
    out = {k: v / ranks if k in ZERO_STAGES[stage] else float(v) for k, v in states.items()}
    out["total"] = sum(out.values())
    return out


def _root_elements(arch) -> int:
    """Parameters outside the transformer blocks (embeddings, final norm, an untied head): FSDP2's root unit."""
    from .arch import blocks
    from .models import build_from_config
    model = build_from_config(arch, device="meta")
    inside = {id(p) for p in blocks(model).parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in inside)


def communication_per_step(arch, ranks: int, stage: int = 3, *, method: dict | None = None,
                           trainable_params: int | None = None, precision: str = "fp32") -> dict[str, float]:
    """Bytes each rank sends (≈ receives) per training step with ring collectives, for the weights and
    gradients of :func:`zero_bytes_per_rank`'s model.

    A ring all-gather or reduce-scatter of ``S`` bytes moves ``(n−1)/n · S`` per rank, an all-reduce twice that
    (Rajbhandari et al. 2020, §7). With ``W`` the working weights, ``G`` the gradients, ``W_t`` the trained
    weights and ``R`` the weights of the root unit (outside the blocks):

    * stage 0 (DDP): all-reduce of ``G`` → ``2·(n−1)/n·G``;
    * stages 1, 2: reduce-scatter of ``G``, all-gather of the updated ``W_t`` → ``(n−1)/n·(G + W_t)``;
    * stage 3 (FSDP2 ``fully_shard`` per block + root): every block is gathered before its forward and again
      before its backward, the root once (FSDP2 keeps the root gathered in between), and ``G`` is
      reduce-scattered → ``(n−1)/n·(2W − R + G)``. A frozen base is gathered like the rest: with LoRA it is
      nearly all the traffic. (The method's own weights are counted with the blocks, where LoRA and adapters
      sit; a prefix encoder sits at the root — a few kB counted twice.)
    """
    ranks = validate.require_int("ranks", ranks, min=1)
    if stage not in ZERO_STAGES:
        raise ValueError(f"stage must be one of {sorted(ZERO_STAGES)} (ZeRO 1–3; 0 = no sharding), got {stage!r}")
    from .estimate import PRECISIONS, QUANTIZED_BASE
    states = _states(arch, trainable_params, precision, method)
    per = PRECISIONS.get(precision) or QUANTIZED_BASE[precision]
    weights, grads = states["parameters"], states["gradients"]
    trained_weights = per["weight"] * grads // per["grad"]
    f = (ranks - 1) / ranks
    if stage == 0:
        out = {"all_gather": 0.0, "reduce_scatter": 0.0, "all_reduce": 2 * f * grads}
    elif stage in (1, 2):
        out = {"all_gather": f * trained_weights, "reduce_scatter": f * grads, "all_reduce": 0.0}
    else:
        root = per.get("base_weight", per["weight"]) * _root_elements(arch)
        out = {"all_gather": f * (2 * weights - root), "reduce_scatter": f * grads, "all_reduce": 0.0}
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    """``python -m peft_lab.scale_out --nproc N --method M --steps S --seed K --out DIR``."""
    parser = argparse.ArgumentParser(prog="python -m peft_lab.scale_out", description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="CPU processes (ranks); 1 is the reference")
    parser.add_argument("--method", choices=METHODS, default="lora")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for adapter/ (model/ for full) and report.json")
    parser.add_argument("--batch-size", type=int, default=8, help="the global batch, split over the ranks")
    parser.add_argument("--examples", type=int, default=64, help="first n training reviews")
    parser.add_argument("--lr", type=float, default=None, help=f"default by method: {LEARNING_RATES}")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--model", default="tiny", help="a load_base_model name: tiny, tiny-llama, a hub id")
    parser.add_argument("--accelerate", action="store_true",
                        help="run inside `accelerate launch` (GPUs; peft_lab/configs/) instead of starting ranks")
    args = parser.parse_args(argv)
    if args.accelerate:
        return train_with_accelerate(Job(args.method, args.steps, args.seed, args.batch_size, args.lr,
                                         args.examples, 1.0, args.optimizer, args.model, args.out))
    report = scale_out(args.nproc, args.method, args.steps, args.seed, args.out, batch_size=args.batch_size,
                       examples=args.examples, lr=args.lr, optimizer=args.optimizer, model=args.model)
    for r in report["ranks"]:
        median = sorted(r["step_seconds"])[len(r["step_seconds"]) // 2]
        print(f"rank {r['rank']}: parameters {r['parameter_bytes']:,} B, gradients {r['gradient_bytes']:,} B, "
              f"optimizer {r['optimizer_bytes']:,} B, median step {median * 1e3:.0f} ms")
    print(f"final loss {report['final_loss']:.4f}; wrote {Path(args.out) / 'report.json'}")
    return report


if __name__ == "__main__":  # the guard matters: spawned ranks import this module again
    main()
