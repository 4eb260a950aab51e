"""Sequence-mixing ops. See `osdn/README.md` for the math and `SPEC.md` section 4 for the API."""

from .osdn import chunk_osdn, fused_recurrent_osdn, naive_recurrent_osdn

__all__ = ["chunk_osdn", "fused_recurrent_osdn", "naive_recurrent_osdn"]
