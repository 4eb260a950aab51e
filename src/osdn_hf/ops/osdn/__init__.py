"""OSDN (Online Scaled DeltaNet) ops: layout `[B, T, H, *]`, states `[N, H, K, V]` and `[N, H, K]`."""

from .chunk import chunk_osdn
from .fused_recurrent import fused_recurrent_osdn
from .naive import naive_recurrent_osdn

__all__ = ["chunk_osdn", "fused_recurrent_osdn", "naive_recurrent_osdn"]
