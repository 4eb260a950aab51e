from .osdn_attention import OSDNAttention

__all__ = ["OSDNAttention"]
