"""portmla: one MLA (Multi-head Latent Attention) API on NVIDIA, AMD, Intel GPUs and CPU.

See DESIGN.md for the contract; the torch reference backend is the executable spec.
"""

from ._version import __version__
from .backends.base import BackendInfo
from .dispatch import (
    list_backends,
    probe,
    supported_block_sizes,
    supported_kv_cache_dtypes,
)
from .kv_formats import allocate_kv_cache, kv_cache_shape
from .layer import MLAAttention, MLABatch
from .ops import (
    concat_and_cache_mla,
    gather_cache,
    merge_attn_states,
    mla_decode,
    mla_prefill_attention,
)
from .platform import Platform, current_platform
from .reasons import UnsupportedError

__all__ = [
    "__version__",
    "BackendInfo",
    "MLAAttention",
    "MLABatch",
    "Platform",
    "UnsupportedError",
    "allocate_kv_cache",
    "concat_and_cache_mla",
    "current_platform",
    "gather_cache",
    "kv_cache_shape",
    "list_backends",
    "merge_attn_states",
    "mla_decode",
    "mla_prefill_attention",
    "probe",
    "supported_block_sizes",
    "supported_kv_cache_dtypes",
]
