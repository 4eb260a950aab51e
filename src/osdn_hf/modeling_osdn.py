"""OSDN language models on the Hugging Face API: cache, block, base model, causal LM and the
classification and question-answering heads."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)

from .configuration_osdn import OSDNConfig
from .hub_code import AUTO_MAP, write_code
from .layers.loss import causal_lm_loss
from .layers.modules import RMSNorm, ShortConvolution, SwiGLUMLP, pack_if_padded, unpack_padding
from .layers.osdn_attention import OSDNAttention
from .ops.osdn.utils import check_cu_seqlens

# transformers 5.24 renamed the cache, as a forward argument and as an output field, from
# `past_key_values` to `cache`. The forwards take either name; outputs carry it under the installed
# version's (`output_cache` reads it without the deprecation warning).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(outputs) -> OSDNCache | None:
    """The cache a forward returned, under whichever name this transformers gives it."""
    return getattr(outputs, CACHE_FIELD)


def _one_cache(past_key_values, cache):
    if past_key_values is not None and cache is not None:
        raise ValueError(
            "pass the cache as `cache` or as `past_key_values` (its name before transformers 5.24), not both"
        )
    return cache if cache is not None else past_key_values


def _packing(cu_seqlens, input_ids, inputs_embeds, attention_mask, kwargs: dict) -> torch.Tensor | None:
    """`cu_seqlens`, or the packing that transformers' padding-free collator
    (`DataCollatorWithFlattening`) describes in a batch of one row with the keyword arguments it
    adds: its flash-attention `cu_seq_lens_q`, or else `position_ids` `[1, T]`, where a new
    sequence begins wherever they do not continue the token before by one (one wait on the GPU to
    read them; not for one token, a decoding step, nor beside a mask that pads, whose position
    ids number the padding, not packed sequences). None where nothing is packed."""
    flash, position_ids = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
    if flash is not None:
        if cu_seqlens is not None:
            raise ValueError("pass packed sequences as `cu_seqlens` or as `cu_seq_lens_q`, not both")
        return flash
    x = input_ids if input_ids is not None else inputs_embeds
    if cu_seqlens is not None or position_ids is None or x is None or x.dim() < 2 or x.shape[0] != 1 or x.shape[1] < 2:
        return cu_seqlens  # (a malformed input is named by OSDNModel.forward)
    if tuple(position_ids.shape) != (1, x.shape[1]):
        raise ValueError(
            f"`position_ids` must be [1, seq_len] = (1, {x.shape[1]}) for this input, "
            f"got shape {tuple(position_ids.shape)}"
        )
    if attention_mask is not None and not bool(attention_mask[:, -x.shape[1] :].all()):
        return None
    positions = position_ids[0]
    starts = (positions[1:] != positions[:-1] + 1).nonzero().view(-1) + 1  # (sequences - 1,)
    if starts.numel() == 0:
        return None
    return torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), x.shape[1])])


class OSDNLayerCache:
    """One layer's decoding state (SPEC section 7), constant in context length.

    `recurrent_state` `[B, H, K, V]` and `precond_state` `[B, H, K]` in float32, and
    `conv_state`, the last `conv_size - 1` inputs of the q, k, v convolutions `[B, D, W - 1]`.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self):
        self.recurrent_state: torch.Tensor | None = None
        self.precond_state: torch.Tensor | None = None
        self.conv_state: tuple[torch.Tensor, ...] | None = None

    def _map(self, fn) -> None:
        if self.recurrent_state is not None:
            self.recurrent_state, self.precond_state = fn(self.recurrent_state), fn(self.precond_state)
            self.conv_state = tuple(fn(c) for c in self.conv_state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda x: x[indices])

    def reset(self) -> None:
        self.__init__()

    def offload(self) -> None:
        """States are small and constant in length: they stay on their device."""

    def prefetch(self) -> None:
        """See `offload`."""

    def get_seq_length(self) -> int:
        raise NotImplementedError("the cache counts tokens, not its layers: call OSDNCache.get_seq_length()")


@torch.compiler.disable
def _own_states(layer: OSDNLayerCache, recurrent_state, precond_state, conv_state):
    """The states `layer` should keep, in memory of the cache's own. A tensor that compiled code
    made can live in memory the code's next call reuses: with `mode="reduce-overhead"`, torch's
    CUDA graphs give each call's outputs the same memory, and a cache that kept the prefill's
    convolution inputs read them overwritten on the next step (an error on the H200:
    `tests/test_compile.py`). So, run outside the compiled code: a state the layer already holds
    (updated in place) stays; one that requires grad stays as given (autograd's); otherwise, without
    gradients, the new state is copied into the one held where that has its shape, dtype and device
    (as an in-place decoding step would have written it), and else cloned."""
    old = (layer.recurrent_state, layer.precond_state, *(layer.conv_state or (None,) * len(conv_state)))
    new = (recurrent_state, precond_state, *conv_state)
    kept = []
    for held, given in zip(old, new):
        if given is held or given.requires_grad:
            kept.append(given)
        elif (
            held is not None
            and not torch.is_grad_enabled()
            and (held.shape, held.dtype, held.device) == (given.shape, given.dtype, given.device)
            and held.is_contiguous()
        ):
            kept.append(held.copy_(given))
        else:
            kept.append(given.clone(memory_format=torch.contiguous_format))
    return kept[0], kept[1], tuple(kept[2:])


class OSDNCache(Cache):
    """Recurrent cache of an OSDN model: one `OSDNLayerCache` per layer plus a token count.

    Memory per sequence does not grow with context. `generate` builds one on its first
    forward; pass it back as `cache` (or `past_key_values`) to continue from where it stopped.
    """

    def __init__(self, num_hidden_layers: int):
        super().__init__(layers=[OSDNLayerCache() for _ in range(num_hidden_layers)])
        self.seen_tokens = 0

    def get_layer_state(self, layer_idx: int) -> dict | None:
        """The state a layer left, or None before the first write."""
        layer = self.layers[layer_idx]
        if layer.recurrent_state is None:
            return None
        return {
            "recurrent_state": layer.recurrent_state,
            "precond_state": layer.precond_state,
            "conv_state": layer.conv_state,
        }

    def update_layer_state(
        self,
        layer_idx: int,
        recurrent_state: torch.Tensor,
        precond_state: torch.Tensor,
        conv_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        own: bool = False,
    ) -> None:
        """Keep a layer's new states. With `own` (the layer passes it under `torch.compile`) the
        cache keeps tensors of its own (`_own_states`) instead of the ones it is given."""
        layer = self.layers[layer_idx]
        if own:
            recurrent_state, precond_state, conv_state = _own_states(layer, recurrent_state, precond_state, conv_state)
        layer.recurrent_state, layer.precond_state, layer.conv_state = recurrent_state, precond_state, conv_state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far (pads included), which is what `generate` slices inputs by."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("an OSDN cache cannot be cropped: the recurrent state does not keep past tokens")

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return any(layer.recurrent_state is not None for layer in self.layers)


class OSDNBlock(GradientCheckpointingLayer):
    """Pre-norm block: `x + attn(attn_norm(x))`, then `x + mlp(mlp_norm(x))`."""

    def __init__(self, config: OSDNConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = OSDNAttention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: OSDNCache | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(
            self.attn_norm(hidden_states),
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            cu_seqlens=cu_seqlens,
        )
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class OSDNPreTrainedModel(PreTrainedModel):
    config_class = OSDNConfig
    config: OSDNConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OSDNBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, ShortConvolution)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                # eta_proj and apf_proj carry the bias that sets the initial eta and lam.
                init.constant_(module.bias, getattr(module, "bias_init", 0.0))
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus the modelling code and `auto_map`, all or nothing.

        Everything is written to a temporary folder beside `save_directory` first, so a save
        that fails leaves `save_directory` as it was. Other files already in the folder (a
        tokenizer, say) stay; weight files of an earlier save are replaced.
        """
        target = Path(save_directory)
        if target.exists() and not target.is_dir():
            raise ValueError(f"`save_directory` must be a folder, got the file {target}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", target.name)
        self.config.auto_map = dict(AUTO_MAP)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise stick to the checkpoint
        try:
            super().save_pretrained(staging, **kwargs)
            write_code(staging)
            if not target.exists():
                os.replace(staging, target)
                return
            for old in target.iterdir():
                if old.name.startswith(("model.safetensors", "model-", "pytorch_model")) and old.is_file():
                    old.unlink()
            for new in staging.iterdir():
                os.replace(new, target / new.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class OSDNModel(OSDNPreTrainedModel):
    """The OSDN decoder stack: embeddings, `OSDNBlock`s and a final RMSNorm."""

    def __init__(self, config: OSDNConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([OSDNBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: OSDNCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        cache: OSDNCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Args beyond the usual ones:
        attention_mask (`torch.Tensor` of shape `[B, T_total]`, *optional*): 0 at padding (its
            last T columns are this input's). Padding neither reads nor writes the state, and its
            positions come out as zeros in `last_hidden_state` and `hidden_states`.
        cu_seqlens (`torch.LongTensor` of shape `[N + 1]`, *optional*): offsets of packed
            sequences in a batch of one row, on the inputs' device; the state resets at each
            boundary.
        cache (`OSDNCache`, *optional*): `past_key_values` under its name since transformers
            5.24; pass one or the other.
        **kwargs: accepted for API compatibility and ignored, but for the packing that
            transformers' `DataCollatorWithFlattening` writes into a batch of one row:
            `cu_seq_lens_q` (its flash-attention offsets) is taken as `cu_seqlens`, and where
            neither is given, `position_ids` that restart begin a new sequence there (OSDN has no
            position embeddings and reads them for nothing else).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        past_key_values = _one_cache(past_key_values, cache)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        if past_key_values is not None and not isinstance(past_key_values, OSDNCache):
            raise ValueError(f"`past_key_values` must be an OSDNCache, got {type(past_key_values).__name__}")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"`attention_mask` must be a [batch, seq_len] 0/1 padding mask, got shape {tuple(attention_mask.shape)}"
            )

        if input_ids is not None and (input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex()):
            raise ValueError(
                f"`input_ids` must be integer token ids [batch, seq_len], got shape {tuple(input_ids.shape)} "
                f"and dtype {input_ids.dtype}"
            )
        if inputs_embeds is not None and (
            inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size
        ):
            raise ValueError(
                f"`inputs_embeds` must be [batch, seq_len, hidden_size = {self.config.hidden_size}], "
                f"got shape {tuple(inputs_embeds.shape)}"
            )
        hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = hidden_states.shape[:2]
        if T == 0:
            raise ValueError(f"the input has no tokens: shape {tuple(hidden_states.shape[:2])} (batch, seq_len)")
        cu_seqlens = _packing(cu_seqlens, input_ids, inputs_embeds, attention_mask, kwargs)
        if cu_seqlens is not None:  # (each layer checks it too, for callers of the layer alone)
            if cu_seqlens.device != hidden_states.device:
                raise ValueError(f"`cu_seqlens` is on {cu_seqlens.device} but the inputs are on {hidden_states.device}")
            if inputs_embeds is None:
                check_cu_seqlens(cu_seqlens, input_ids, "input_ids")
            else:
                check_cu_seqlens(cu_seqlens, inputs_embeds, "inputs_embeds")
        # Padding neither reads nor writes the state: the real tokens are packed once here, and
        # every layer gets them as packed sequences (one wait on the GPU per forward, not several
        # per layer). A mask of ones, what `generate` passes at every step, is simply dropped.
        hidden_states, indices, cu_seqlens = pack_if_padded(hidden_states, attention_mask, cu_seqlens)
        if use_cache and past_key_values is None:
            past_key_values = OSDNCache(self.config.num_hidden_layers)
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                past_key_values=past_key_values if use_cache else None,
                use_cache=use_cache,
                cu_seqlens=cu_seqlens,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if indices is not None:  # zeros where the mask pads
            hidden_states = unpack_padding(hidden_states, indices, B, T)
            if output_hidden_states:
                all_hidden_states = tuple(unpack_padding(h, indices, B, T) for h in all_hidden_states)
        if use_cache:
            past_key_values.seen_tokens += T

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **{CACHE_FIELD: past_key_values if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


def _state_tensors(cache: OSDNCache) -> list[torch.Tensor] | None:
    """Every layer's cached states in a fixed order (S, d, the three conv states), or None
    while some layer has none."""
    states = []
    for layer in cache.layers:
        if layer.recurrent_state is None:
            return None
        states += [layer.recurrent_state, layer.precond_state, *layer.conv_state]
    return states


def _capturable(states: list[torch.Tensor], input_ids: torch.Tensor) -> bool:
    """Whether a step on these states can be captured: all on the ids' device, contiguous, with
    the ids' batch, `S` and `d` in float32 (as in-place decoding needs them)."""
    return all(
        x.device == input_ids.device and x.is_contiguous() and x.shape[0] == input_ids.shape[0] for x in states
    ) and all(x.dtype == torch.float32 for x in states[0::5] + states[1::5])


class _DecodeGraph:
    """One captured decoding step (one token a row, a fixed batch and state layout) and the
    buffers it reads and writes: the input ids, every layer's states (updated in place by the
    step) and the logits."""

    def __init__(self, model: OSDNForCausalLM, states: list[torch.Tensor], batch: int):
        device = states[0].device
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.states = [x.clone() for x in states]
        cache = OSDNCache(model.config.num_hidden_layers)
        for i, layer in enumerate(cache.layers):
            S, d, *conv = self.states[5 * i : 5 * i + 5]
            layer.recurrent_state, layer.precond_state, layer.conv_state = S, d, tuple(conv)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            # two eager steps on the buffers first: kernels compile and per-stream buffers are
            # made outside the capture (the buffers' values do not matter, `__call__` fills them)
            for _ in range(2):
                model._decode_logits(self.input_ids, cache)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=stream):
                self.logits = model._decode_logits(self.input_ids, cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        # a state not updated in place (a cache whose convolution inputs are in another dtype than
        # the projections', say) would leave the graph reading stale buffers
        self.valid = all(a is b for a, b in zip(_state_tensors(cache), self.states))
        # The states' positions by dtype (float32 S and d, the convolution inputs in the model's
        # dtype): a grouped copy of one dtype is a few kernels, while one of mixed dtypes copies
        # tensor by tensor (`_foreach_copy_`'s slow path: 120 copies for osdn-340m, 0.6-0.95 ms of
        # host time each way on an H200's host, `benchmarks/results/gr57_fa97118.json`).
        dtypes = dict.fromkeys(x.dtype for x in states)
        self.groups = [[i for i, x in enumerate(states) if x.dtype == dtype] for dtype in dtypes]
        self.buffers = [[self.states[i] for i in group] for group in self.groups]

    def __call__(self, input_ids: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        """Logits `[B, 1, vocab]` of one step from `input_ids` `[B, 1]`; `states` (a cache's,
        laid out as the captured ones) are read and then updated in place."""
        grouped = [[states[i] for i in group] for group in self.groups]
        for buffers, cached in zip(self.buffers, grouped):
            torch._foreach_copy_(buffers, cached)
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        for buffers, cached in zip(self.buffers, grouped):
            torch._foreach_copy_(cached, buffers)
        return self.logits.clone()


# Modules and parameters registered anywhere since import (`CUDAGraphDecoding` captures again when
# this moves: a module swapped in, as adapters do, or a parameter assigned)
_registrations = [0]


def _count_registration(*args) -> None:
    _registrations[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)


class CUDAGraphDecoding:
    """The decoding steps of an `OSDNForCausalLM` replayed from CUDA graphs
    (`config.cuda_graph_decoding`).

    A token at batch 1 is 12 small kernels a layer (at 7c4c412), each launched from the host, so
    eager decoding waits on the host, not the GPU. A graph launches a whole step at once. One
    graph is captured for each batch size and state layout, on first use. All are dropped, and
    captured again when next used, when a weight moves (`to`, `half`, a new tensor in `.data`)
    or any module or parameter is registered (a module swapped in, a parameter assigned). A
    cache's states are copied into the graph's buffers before a step and back after it (a
    grouped copy per dtype each way), so caches stay independent of each other and of the
    graphs, and a cache can go on decoding eagerly. Each CUDA stream has its own graphs, and one
    thread at a time uses them, so concurrent decoding on several streams stays correct.

    A replayed step runs no Python: hooks on the model's modules do not run in it, and a change
    that neither moves a weight nor registers a module (an adapter switched off by a flag) is not
    seen.
    """

    max_graphs = 8

    def __init__(self):
        self.lock = threading.Lock()
        self.params: list[nn.Parameter] = []
        self.weights: list[int] = []
        self.registrations = -1
        self.device: torch.device | None = None
        self.graphs: dict[tuple, _DecodeGraph] = {}

    def _current(self, model: OSDNForCausalLM, device: torch.device) -> bool:
        """Whether the graphs were captured on the model's weights as they are now."""
        return (
            self.registrations == _registrations[0]
            and self.device == device
            and all(p.data_ptr() == w for p, w in zip(self.params, self.weights))
        )

    def __call__(self, model: OSDNForCausalLM, input_ids: torch.Tensor, states: list[torch.Tensor]):
        """The step's logits, or None where the model's weights are not all on the inputs' GPU
        (split over devices, or offloaded): graphs are not used there."""
        with self.lock:
            return self._step(model, input_ids, states)

    def _step(self, model: OSDNForCausalLM, input_ids: torch.Tensor, states: list[torch.Tensor]):
        device = input_ids.device
        if not self._current(model, device):
            self._drop_graphs()
            self.params = list(model.parameters())
            if any(p.device != device for p in self.params):
                self.registrations = -1  # look again next time
                return None
            self.weights = [p.data_ptr() for p in self.params]
            self.registrations, self.device = _registrations[0], device
        stream = torch.cuda.current_stream(device).cuda_stream
        key = (stream, input_ids.shape[0], *((x.shape, x.dtype, x.device, x.is_contiguous()) for x in states))
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                self._drop_graphs(next(iter(self.graphs)))
            graph = _DecodeGraph(model, states, input_ids.shape[0]) if _capturable(states, input_ids) else None
            self.graphs[key] = graph if graph is not None and graph.valid else None  # None: decoded eagerly
        graph = self.graphs[key]
        return None if graph is None else graph(input_ids, states)

    def _drop_graphs(self, key: tuple | None = None) -> None:
        """Drop one graph (or all), after the GPU has finished any replay of it still queued."""
        if self.graphs:
            torch.cuda.synchronize(self.device)
            if key is None:
                self.graphs = {}
            else:
                del self.graphs[key]


# each model's graphs, kept off the module so that copying or pickling a model never meets them
_DECODE_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class OSDNForCausalLM(OSDNPreTrainedModel, GenerationMixin):
    """OSDN with a language-modelling head, for `generate`, `pipeline` and `Trainer`."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: OSDNConfig):
        super().__init__(config)
        self.model = OSDNModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate must not build a DynamicCache: the model builds its OSDNCache on the first forward.
        return False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: OSDNCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: OSDNCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Args beyond `OSDNModel.forward`'s:
        labels (`torch.LongTensor` of shape `[B, T]`, *optional*): targets, shifted inside;
            -100 marks positions left out of the loss.
        logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0): compute logits
            only for the last `logits_to_keep` positions (0: all), or for the given indices.
        cache (`OSDNCache`, *optional*): as in `OSDNModel.forward`.
        **kwargs: loss arguments such as `num_items_in_batch` (passed by `Trainer`), and the
            packing of `DataCollatorWithFlattening` (`cu_seq_lens_q` or `position_ids`, as in
            `OSDNModel.forward`); others are ignored.
        """
        if return_dict is None:
            return_dict = self.config.return_dict
        cu_seqlens = _packing(cu_seqlens, input_ids, inputs_embeds, attention_mask, kwargs)
        if self.config.cuda_graph_decoding:
            step_cache = _one_cache(past_key_values, cache)
            logits = self._replayed_step(
                input_ids, attention_mask, inputs_embeds, step_cache, labels, use_cache, output_hidden_states,
                cu_seqlens, logits_to_keep,
            )  # fmt: skip
            if logits is not None:
                step_cache.seen_tokens += 1
                output = CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: step_cache})
                return output if return_dict else output.to_tuple()
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cu_seqlens=cu_seqlens,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            kept = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            kept = hidden_states[:, logits_to_keep]
        logits = self.lm_head(kept)

        loss = None
        if labels is not None:
            if cu_seqlens is not None:
                # A sequence's last token does not predict the next sequence's first token.
                labels = labels.clone()
                labels[:, cu_seqlens[1:-1]] = -100
            # transformers' loss, without its float32 copies of the logits (layers/loss.py)
            loss = causal_lm_loss(logits, labels, vocab_size=self.config.vocab_size, **kwargs)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: output_cache(outputs)},
        )
        return output if return_dict else output.to_tuple()

    def _decode_logits(self, input_ids: torch.Tensor, cache: OSDNCache) -> torch.Tensor:
        """One eager decoding step's logits (what `CUDAGraphDecoding` captures)."""
        hidden_states = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True).last_hidden_state
        return self.lm_head(hidden_states)

    @torch.compiler.disable  # under torch.compile too, a step is captured and replayed as it is
    def _replayed_step(
        self,
        input_ids,
        attention_mask,
        inputs_embeds,
        cache,
        labels,
        use_cache,
        output_hidden_states,
        cu_seqlens,
        logits_to_keep,
    ) -> torch.Tensor | None:
        """The logits of a decoding step replayed from a CUDA graph, or None where the call is not
        such a step: one token a row of ids on a GPU, a filled cache whose states decoding updates
        in place, no autograd, labels, packing, hidden states or padding in the new column."""
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if not (
            input_ids is not None
            and inputs_embeds is None
            and input_ids.is_cuda
            and input_ids.dim() == 2
            and input_ids.shape[1] == 1
            and isinstance(cache, OSDNCache)
            and use_cache
            and labels is None
            and cu_seqlens is None
            and not output_hidden_states
            and isinstance(logits_to_keep, int)
            and not torch.is_grad_enabled()
            and not torch.cuda.is_current_stream_capturing()
        ):
            return None
        states = _state_tensors(cache)  # their layout is checked once per layout (`CUDAGraphDecoding`)
        if states is None:
            return None
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            return None
        graphs = _DECODE_GRAPHS.get(self)
        if graphs is None:
            graphs = _DECODE_GRAPHS[self] = CUDAGraphDecoding()
        return graphs(self, input_ids, states)


class _OSDNWithHead(OSDNPreTrainedModel):
    """The base model under a task head (`self.model`, as in `OSDNForCausalLM`, so a causal LM's
    checkpoint loads into any head, the head itself initialised anew)."""

    def __init__(self, config: OSDNConfig):
        super().__init__(config)
        self.model = OSDNModel(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def _base(self, input_ids, attention_mask, inputs_embeds, cu_seqlens, kwargs: dict, **model_kwargs):
        """`(outputs, cu_seqlens)`: the base model's outputs, and the packing it ran with."""
        cu_seqlens = _packing(cu_seqlens, input_ids, inputs_embeds, attention_mask, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            cu_seqlens=cu_seqlens,
            **model_kwargs,
        )
        return outputs, cu_seqlens


def last_token_positions(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    pad_token_id: int | None,
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(rows, columns)` of each sequence's last token in an input of `seq_len` tokens a row: the
    end of every packed sequence (`cu_seqlens`), else each row's last position the mask keeps
    (left or right padding), else, as transformers does, each row's last id that is not
    `pad_token_id`. None where every row ends at its last position. Nothing here waits on the GPU."""
    if cu_seqlens is not None:
        ends = cu_seqlens[1:] - 1
        return torch.zeros_like(ends), ends
    if attention_mask is not None:
        kept = attention_mask[:, -seq_len:].to(torch.int32)
    elif input_ids is not None and pad_token_id is not None:
        kept = (input_ids != pad_token_id).to(torch.int32)
    else:
        return None
    columns = torch.arange(seq_len, device=kept.device, dtype=torch.int32)
    return torch.arange(kept.shape[0], device=kept.device), (columns * kept).argmax(-1)


class OSDNForSequenceClassification(_OSDNWithHead):
    """OSDN with a linear classifier (`score`) on each sequence's last token, the one whose hidden
    state has read the whole sequence. Padding is found from `attention_mask` (left or right),
    else from `config.pad_token_id` in `input_ids`; packed sequences (`cu_seqlens`, or transformers'
    padding-free collator) each get their own logits. The loss is transformers' for
    `config.problem_type` (regression, single- or multi-label), a mean over the batch's sequences."""

    # Trainer passes `num_items_in_batch` to a forward that takes **kwargs and then leaves the loss
    # undivided by the accumulation steps; a mean over sequences needs it divided (tested).
    accepts_loss_kwargs = False

    def __init__(self, config: OSDNConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: OSDNCache | None = None,
        labels: torch.LongTensor | torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        cache: OSDNCache | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        """Args as in `OSDNForCausalLM.forward`, but:
        labels (`[B]` class ids, `[B, num_labels]` targets for multi-label or regression;
            `[N]` / `[N, num_labels]` for N packed sequences), *optional*.
        Returns logits `[B, num_labels]`, or `[N, num_labels]` for packed sequences.
        """
        if return_dict is None:
            return_dict = self.config.return_dict
        outputs, cu_seqlens = self._base(
            input_ids, attention_mask, inputs_embeds, cu_seqlens, kwargs,
            past_key_values=past_key_values, cache=cache, use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )  # fmt: skip
        hidden_states = outputs.last_hidden_state
        last = last_token_positions(
            input_ids, attention_mask, cu_seqlens, self.config.pad_token_id, hidden_states.shape[1]
        )
        pooled = hidden_states[:, -1] if last is None else hidden_states[last]
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            if labels.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"`labels` must hold one entry a sequence, {logits.shape[0]} here, got shape {tuple(labels.shape)}"
                )
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        output = SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_FIELD: output_cache(outputs)}
        )
        return output if return_dict else output.to_tuple()


class OSDNForTokenClassification(_OSDNWithHead):
    """OSDN with a linear classifier (`score`) on every token, after dropout
    (`config.classifier_dropout`, 0.1 when unset, as transformers' generic heads). Each token's
    hidden state has read only the tokens before it. Positions the mask pads get the classifier's
    bias; give them the label -100."""

    def __init__(self, config: OSDNConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        **kwargs,
    ) -> TokenClassifierOutput | tuple:
        """Args as in `OSDNForCausalLM.forward`, but `labels` `[B, T]` (-100 left out of the loss)
        are not shifted. Returns logits `[B, T, num_labels]`. The loss is a mean over the labelled
        tokens, or their sum over `num_items_in_batch` where `Trainer` passes it (so that
        accumulated steps average over all their tokens)."""
        if return_dict is None:
            return_dict = self.config.return_dict
        outputs, _ = self._base(
            input_ids, attention_mask, inputs_embeds, cu_seqlens, kwargs,
            use_cache=False, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            if tuple(labels.shape) != tuple(logits.shape[:2]):
                raise ValueError(
                    f"`labels` must be [batch, seq_len] = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}"
                )
            loss = self.loss_function(logits, labels, self.config, num_items_in_batch=kwargs.get("num_items_in_batch"))
        output = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()


class OSDNForQuestionAnswering(_OSDNWithHead):
    """OSDN with extractive question answering's head (`qa_outputs`): start and end logits for
    every token, the lowest float at positions `attention_mask` pads (so that no answer starts or
    ends there and a batch's padding changes no loss). The model reads left to right, so put the
    question before the context."""

    def __init__(self, config: OSDNConfig):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        **kwargs,
    ) -> QuestionAnsweringModelOutput | tuple:
        """Args as in `OSDNForCausalLM.forward`, but `start_positions` and `end_positions` `[B]`
        (the answer's first and last token; positions past the input are left out of the loss).
        Returns `start_logits` and `end_logits` `[B, T]`."""
        if return_dict is None:
            return_dict = self.config.return_dict
        outputs, _ = self._base(
            input_ids, attention_mask, inputs_embeds, cu_seqlens, kwargs,
            use_cache=False, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).unbind(-1)
        if attention_mask is not None:  # padding is no answer, and its width changes no loss
            pads = attention_mask[:, -start_logits.shape[1] :] == 0
            start_logits = start_logits.masked_fill(pads, torch.finfo(start_logits.dtype).min)
            end_logits = end_logits.masked_fill(pads, torch.finfo(end_logits.dtype).min)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
        output = QuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=outputs.hidden_states
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "OSDNCache",
    "OSDNModel",
    "OSDNForCausalLM",
    "OSDNForSequenceClassification",
    "OSDNForTokenClassification",
    "OSDNForQuestionAnswering",
    "OSDNPreTrainedModel",
    "OSDNBlock",
]
