"""OSDN model configuration."""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from .ops.osdn.utils import MAX_HEAD_DIM

PRECONDITIONERS = ("osdn", "none")


class OSDNConfig(PretrainedConfig):
    r"""
    Configuration of an OSDN (Online Scaled DeltaNet) language model: DeltaNet whose
    delta-rule write key is scaled per feature by a preconditioner `d_t` learned online
    (SPEC.md sections 2 and 5). The defaults are the osdn-340m shapes (SPEC.md section 6);
    with `preconditioner="none"` the same code builds plain DeltaNet.

    Args:
        vocab_size (`int`, *optional*, defaults to 32000):
            Vocabulary size: rows of the token embedding and of the output head.
        hidden_size (`int`, *optional*, defaults to 1024):
            Width of the residual stream.
        num_hidden_layers (`int`, *optional*, defaults to 24):
            Number of `OSDNBlock`s.
        num_heads (`int`, *optional*, defaults to 8):
            Number of OSDN heads per layer.
        expand_k (`float`, *optional*, defaults to 1.0):
            Key width as a multiple of `hidden_size`; the head key dim is `expand_k * hidden_size / num_heads`.
        expand_v (`float`, *optional*, defaults to 1.0):
            Value width as a multiple of `hidden_size`; the head value dim is `expand_v * hidden_size / num_heads`.
        intermediate_size (`int`, *optional*):
            Width of the SwiGLU MLP. If unset: `2/3 * hidden_ratio * hidden_size` rounded up to a
            multiple of 256, as in flash-linear-attention.
        hidden_ratio (`int`, *optional*, defaults to 4):
            Used only to derive `intermediate_size` when that is unset.
        conv_size (`int`, *optional*, defaults to 4):
            Kernel width of the causal depthwise convolutions on q, k and v.
        conv_bias (`bool`, *optional*, defaults to `False`):
            Whether those convolutions have a bias.
        use_output_gate (`bool`, *optional*, defaults to `False`):
            Gate the per-head output RMSNorm with `silu(g_proj(x))`.
        norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every RMSNorm.
        preconditioner (`str`, *optional*, defaults to `"osdn"`):
            `"osdn"`: the online preconditioner of SPEC section 2. `"none"`: DeltaNet (`d_t = 1`,
            no `eta_proj` or `apf_proj`).
        use_apf (`bool`, *optional*, defaults to `True`):
            Adaptive Preconditioner Forgetting: `lam_t = sigmoid(apf_proj(x))` pulls `d_t` back
            toward 1. Without it `lam_t = 1` and `apf_proj` does not exist.
        eta_max (`float`, *optional*, defaults to 2.0):
            Upper bound of the preconditioner step: `eta_t = eta_max * sigmoid(eta_proj(x))`. 2.0 won
            the MQAR defaults sweep over 1.0 (`benchmarks/RECALL.md`, `benchmarks/results/mqar_defaults.json`).
        precond_eta_init (`float`, *optional*, defaults to 0.9):
            Initial `eta_t` (the bias of `eta_proj` is set to `logit(precond_eta_init / eta_max)`);
            must lie in (0, eta_max).
        apf_init (`float`, *optional*, defaults to 0.99):
            Initial APF retention `lam_t` (the bias of `apf_proj` is `logit(apf_init)`); in (0, 1).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of weight matrices and embeddings.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Share the output head with the token embedding.
        use_cache (`bool`, *optional*, defaults to `True`):
            Return the recurrent cache (`OSDNCache`) from forward passes in eval mode.
        cuda_graph_decoding (`bool`, *optional*, defaults to `False`):
            Replay one-token decoding steps on a GPU from CUDA graphs (`CUDAGraphDecoding`): the
            same kernels without a launch from the host for each. Elsewhere it changes nothing.
        pad_token_id (`int`, *optional*):
            Padding token id.
        bos_token_id (`int`, *optional*, defaults to 1):
            Beginning-of-sequence token id.
        eos_token_id (`int`, *optional*, defaults to 2):
            End-of-sequence token id.

    Example:
        >>> from osdn_hf import OSDNConfig, OSDNForCausalLM
        >>> config = OSDNConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=2)
        >>> model = OSDNForCausalLM(config)
    """

    model_type = "osdn"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_heads: int = 8,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        intermediate_size: int | None = None,
        hidden_ratio: int = 4,
        conv_size: int = 4,
        conv_bias: bool = False,
        use_output_gate: bool = False,
        norm_eps: float = 1e-6,
        preconditioner: str = "osdn",
        use_apf: bool = True,
        eta_max: float = 2.0,
        precond_eta_init: float = 0.9,
        apf_init: float = 0.99,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        cuda_graph_decoding: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.hidden_ratio = hidden_ratio
        if intermediate_size is None:
            intermediate_size = 256 * math.ceil(int(hidden_size * hidden_ratio * 2 / 3) / 256)
        self.intermediate_size = intermediate_size
        self.conv_size = conv_size
        self.conv_bias = conv_bias
        self.use_output_gate = use_output_gate
        self.norm_eps = norm_eps
        self.preconditioner = preconditioner
        self.use_apf = use_apf
        self.eta_max = eta_max
        self.precond_eta_init = precond_eta_init
        self.apf_init = apf_init
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.cuda_graph_decoding = cuda_graph_decoding
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_k_dim(self) -> int:
        return round(self.hidden_size * self.expand_k) // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return round(self.hidden_size * self.expand_v) // self.num_heads

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "intermediate_size", "conv_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        for name in ("expand_k", "expand_v"):
            value = getattr(self, name)
            width = self.hidden_size * value
            if not value > 0 or not math.isclose(width, round(width)) or round(width) % self.num_heads:
                raise ValueError(
                    f"`{name}` * hidden_size must be an integer divisible by num_heads={self.num_heads}, "
                    f"got {name}={value!r} with hidden_size={self.hidden_size}"
                )
        for name, dim in (("head_k_dim", self.head_k_dim), ("head_v_dim", self.head_v_dim)):
            if dim > MAX_HEAD_DIM:
                raise ValueError(f"{name} = {dim} exceeds the kernels' limit of {MAX_HEAD_DIM}; use more heads")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"`preconditioner` must be one of {PRECONDITIONERS}, got {self.preconditioner!r}")
        if not self.eta_max > 0:
            raise ValueError(f"`eta_max` must be positive, got {self.eta_max!r}")
        if not 0 < self.precond_eta_init < self.eta_max:
            raise ValueError(
                f"`precond_eta_init` must lie in (0, eta_max={self.eta_max}), got {self.precond_eta_init!r}"
            )
        if not 0 < self.apf_init < 1:
            raise ValueError(f"`apf_init` must lie in (0, 1), got {self.apf_init!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"`norm_eps` must be positive, got {self.norm_eps!r}")
        if not self.initializer_range > 0:
            raise ValueError(f"`initializer_range` must be positive, got {self.initializer_range!r}")
