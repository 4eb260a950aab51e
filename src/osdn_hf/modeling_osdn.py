"""OSDN language models on the Hugging Face API: cache, block, base model and causal LM."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_osdn import OSDNConfig
from .hub_code import AUTO_MAP, write_code
from .layers.loss import causal_lm_loss
from .layers.modules import RMSNorm, ShortConvolution, SwiGLUMLP, pack_if_padded, unpack_padding
from .layers.osdn_attention import OSDNAttention

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
    ) -> None:
        layer = self.layers[layer_idx]
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
            sequences in a batch of one row; the state resets at each boundary.
        cache (`OSDNCache`, *optional*): `past_key_values` under its name since transformers
            5.24; pass one or the other.
        **kwargs: accepted for API compatibility (for example `position_ids`, which OSDN
            does not use) and ignored.
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

        hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = hidden_states.shape[:2]
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
        **kwargs: loss arguments such as `num_items_in_batch` (passed by `Trainer`); others
            are ignored.
        """
        if return_dict is None:
            return_dict = self.config.return_dict
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


__all__ = ["OSDNCache", "OSDNModel", "OSDNForCausalLM", "OSDNPreTrainedModel", "OSDNBlock"]
