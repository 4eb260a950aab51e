"""osdn-hf: OSDN (Online Scaled DeltaNet) language models for Hugging Face transformers.

Importing the package registers `model_type="osdn"` with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_osdn import OSDNConfig
from .modeling_osdn import OSDNCache, OSDNForCausalLM, OSDNModel, OSDNPreTrainedModel
from .ops import chunk_osdn, fused_recurrent_osdn, naive_recurrent_osdn

__version__ = "0.1.0"

AutoConfig.register(OSDNConfig.model_type, OSDNConfig, exist_ok=True)
AutoModel.register(OSDNConfig, OSDNModel, exist_ok=True)
AutoModelForCausalLM.register(OSDNConfig, OSDNForCausalLM, exist_ok=True)

__all__ = [
    "OSDNConfig",
    "OSDNCache",
    "OSDNModel",
    "OSDNForCausalLM",
    "OSDNPreTrainedModel",
    "chunk_osdn",
    "fused_recurrent_osdn",
    "naive_recurrent_osdn",
]
