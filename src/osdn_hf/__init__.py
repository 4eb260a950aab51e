"""osdn-hf: OSDN (Online Scaled DeltaNet) language models for Hugging Face transformers.

Importing the package registers `model_type="osdn"` with `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoModelForSequenceClassification`, `AutoModelForTokenClassification`
and `AutoModelForQuestionAnswering`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_osdn import OSDNConfig
from .modeling_osdn import (
    OSDNCache,
    OSDNForCausalLM,
    OSDNForQuestionAnswering,
    OSDNForSequenceClassification,
    OSDNForTokenClassification,
    OSDNModel,
    OSDNPreTrainedModel,
)
from .ops import chunk_osdn, fused_recurrent_osdn, naive_recurrent_osdn

__version__ = "0.1.0"

AutoConfig.register(OSDNConfig.model_type, OSDNConfig, exist_ok=True)
AutoModel.register(OSDNConfig, OSDNModel, exist_ok=True)
AutoModelForCausalLM.register(OSDNConfig, OSDNForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(OSDNConfig, OSDNForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(OSDNConfig, OSDNForTokenClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(OSDNConfig, OSDNForQuestionAnswering, exist_ok=True)

__all__ = [
    "OSDNConfig",
    "OSDNCache",
    "OSDNModel",
    "OSDNForCausalLM",
    "OSDNForSequenceClassification",
    "OSDNForTokenClassification",
    "OSDNForQuestionAnswering",
    "OSDNPreTrainedModel",
    "chunk_osdn",
    "fused_recurrent_osdn",
    "naive_recurrent_osdn",
]
