"""Reference files made by AdapterHub ``adapters`` (notebook 03, "Equal to AdapterHub").

``python -m peft_lab.reference_adapterhub --out data/reference/adapterhub`` runs only where AdapterHub is
installed (the second environment, ``.ci/floor``; it pins transformers ~=4.57.6). For each placement it adds an
AdapterHub adapter to the shipped tiny model, gives every adapter tensor fixed non-zero values (seeded), saves
it with AdapterHub's own ``save_adapter(..., with_head=False, use_safetensors=True)`` into ``<out>/<placement>/``
and stores AdapterHub's logits on fixed inputs in ``<out>/<placement>/logits.safetensors``. The main
environment (notebook 03, ``tests/test_adapters.py``) imports those adapters with
``peft_lab.interop_adapterhub`` and compares logits; ``tests/adapterhub`` regenerates the files and checks
that they equal the committed ones.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from .core import fill_seeded

SEED = 0
NAME = "reference"
#: placement → the AdapterHub config class name (1.3.0) of the committed reference files: Pfeiffer = SeqBnConfig,
#: Houlsby = DoubleSeqBnConfig.
CONFIGS = {"pfeiffer": "SeqBnConfig", "houlsby": "DoubleSeqBnConfig"}
#: Every placement compared with AdapterHub in its own environment (``tests/adapterhub``): also parallel = ParBnConfig.
ADAPTERHUB_CONFIGS = {**CONFIGS, "parallel": "ParBnConfig"}
INPUT_SHAPE = (2, 12)


def reference_inputs(vocab_size: int) -> torch.Tensor:
    """The fixed token ids the logits are computed on."""
    return torch.randint(0, vocab_size, INPUT_SHAPE, generator=torch.Generator().manual_seed(SEED))


def adapterhub_model(placement: str, name: str = NAME, model=None, seed: int = SEED):
    """The tiny model (or ``model``) with an AdapterHub adapter of ``placement`` whose tensors all get fixed
    non-zero values N(0, 0.05²) from ``seed`` (in sorted key order), active and trainable."""
    import adapters

    from .models import load_base_model
    if model is None:
        model = load_base_model("tiny", device="cpu")[0]
    model.config.name_or_path = "tiny"  # the name AdapterHub writes as model_name (never a local path)
    adapters.init(model)
    model.add_adapter(name, config=getattr(adapters, ADAPTERHUB_CONFIGS[placement])())
    model.train_adapter(name)  # freezes the base, activates the adapter
    fill_seeded({k: p for k, p in model.named_parameters() if f".adapters.{name}." in k}, seed, 0.05)
    return model.eval()


def write_reference(out: str | Path) -> list[Path]:
    """Write ``<out>/<placement>/{adapter_config.json, adapter.safetensors, logits.safetensors}``."""
    from safetensors.torch import save_file
    out = Path(out)
    written = []
    for placement in CONFIGS:
        model = adapterhub_model(placement)
        ids = reference_inputs(model.config.vocab_size)
        with torch.no_grad():
            logits = model(ids).logits
        target = out / placement
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
            model.save_adapter(tmp, NAME, with_head=False, use_safetensors=True)
            save_file({"input_ids": ids, "logits": logits.contiguous()}, str(Path(tmp) / "logits.safetensors"))
            target.mkdir(parents=True, exist_ok=True)
            for f in sorted(Path(tmp).iterdir()):
                shutil.copyfile(f, target / f.name)
                written.append(target / f.name)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/reference/adapterhub")
    args = parser.parse_args(argv)
    for path in write_reference(args.out):
        print(path, path.stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
