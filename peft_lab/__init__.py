"""peft-lab: parameter-efficient fine-tuning derived, built and measured from scratch.

The public names below are what the notebooks use; each is documented where it is defined.
"""

from . import offline_imports

offline_imports.install()  # first: before anything imports peft, and through it bitsandbytes (see the module)

from . import arch
from .adapters import (
    BottleneckAdapter,
    BottleneckConfig,
    apply_adapters,
    bottleneck_config,
    bottleneck_layers,
    bottleneck_state_dict,
    disable_adapters,
    load_adapters,
    load_bottleneck_state_dict,
    remove_adapters,
    save_adapters,
)
from .colab import REPO_URL
from .data import collate, encode_task, encode_texts, evaluate_task, load_heldout, load_task, perplexity
from .estimate import estimate_memory
from .exercises import check
from .ia3 import (
    IA3Config,
    IA3Layer,
    apply_ia3,
    disable_ia3,
    ia3_config,
    ia3_layers,
    ia3_state_dict,
    load_ia3_state_dict,
    merge_ia3,
    remove_ia3,
    unmerge_ia3,
)
from .interop import export_peft_adapter, import_peft_adapter
from .interop_adapterhub import export_adapterhub_adapter, import_adapterhub_adapter
from .lora import (
    DoRALinear,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    disable_lora,
    load_lora_state_dict,
    lora_config,
    lora_layers,
    lora_scaling,
    lora_state_dict,
    loraplus_optimizer,
    magnitude_direction_change,
    merge_lora,
    query_weight_changes,
    remove_lora,
    unmerge_lora,
)
from .measure import count_parameters, measure_memory, print_trainable_parameters, time_fn
from .models import build_from_config, load_base_model
from .multi_lora import (
    add_lora_adapter,
    hotswap_adapter,
    lora_adapter_names,
    lora_adapter_state_dict,
    merge_adapters,
    mixed_batch,
    remove_lora_adapters,
    set_active_adapter,
)
from .paths import data_dir, pick_device
from .plots import plot_history, plot_memory, plot_parameters
from .prefix import (
    PrefixModel,
    PrefixTuningModel,
    PromptTuningModel,
    apply_prefix_tuning,
    apply_prompt_tuning,
    disable_prefix,
    fold_prefix_projection,
    remove_prefix,
)
from .qlora import NF4Weight, dequantize_model, nf4_code, quantize_model, quantize_nf4, stored_bytes
from .results import record, save_figure
from .train import History, train

__version__ = "0.1.0"
