"""Peers (``--peers``): other MLA decode kernels on the same inputs, when importable.

* ``flash_mla`` (https://github.com/deepseek-ai/FlashMLA): ``get_mla_metadata`` +
  ``flash_mla_with_kvcache``; needs block size 64, a bf16/fp16 cache, and one query
  length for the whole batch (its q is ``[B, s_q, H, 576]``).
* ``flashinfer`` (https://docs.flashinfer.ai/api/mla.html):
  ``flashinfer.mla.BatchMLAPagedAttentionWrapper`` (plan once, then ``run``).

The planning / scheduler-metadata step runs once per configuration, outside the timed
region, as engines do once per step for all layers. Rows are gated by the same
comparison with the reference backend as portmla's own rows.
Peers run only on bf16 caches (``--kv-cache-dtype bfloat16``/``auto``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch

from .inputs import DecodeInputs

PEERS = ("flash_mla", "flashinfer")
PEER_KV_FORMATS = ("bfloat16",)


class PeerUnsupported(Exception):
    """This peer cannot run this configuration; the message says why."""


def availability() -> dict[str, str | None]:
    """Per peer: None when importable, else why not."""
    out = {}
    for name in PEERS:
        try:
            importlib.import_module(name)
            out[name] = None
        except Exception as e:  # noqa: BLE001 - reported to the user
            out[name] = f"not importable ({type(e).__name__}: {e})"
    return out


def version(name: str) -> str | None:
    try:
        return str(getattr(importlib.import_module(name), "__version__", "unknown"))
    except Exception:  # noqa: BLE001
        return None


def make_calls(name: str, inp: DecodeInputs) -> list[Callable[[], torch.Tensor]]:
    """One callable per cache copy returning ``out [T, H, L]``; ``PeerUnsupported`` if not."""
    if inp.q.device.type != "cuda":
        raise PeerUnsupported(f"{name} needs a CUDA device (got {inp.q.device.type})")
    if inp.kv_cache_dtype not in PEER_KV_FORMATS:
        raise PeerUnsupported(f"kv_cache_dtype={inp.kv_cache_dtype} (peers run on: "
                              f"{', '.join(PEER_KV_FORMATS)})")
    if name == "flash_mla":
        return _flash_mla(inp)
    if name == "flashinfer":
        return _flashinfer(inp)
    raise PeerUnsupported(f"unknown peer {name!r} (known: {', '.join(PEERS)})")


def _flash_mla(inp: DecodeInputs):
    fm = importlib.import_module("flash_mla")
    if inp.block_size != 64:
        raise PeerUnsupported(f"block_size={inp.block_size} (flash_mla supports: 64)")
    if not inp.spec.uniform:
        raise PeerUnsupported(f"spec {inp.spec.text} mixes query lengths (flash_mla takes one "
                              f"s_q per batch)")
    b, s_q, h = len(inp.q_lens), inp.q_lens[0], inp.heads
    d, dv = inp.kv_lora_rank + inp.rope_dim, inp.kv_lora_rank
    q4 = inp.q.view(b, s_q, h, d)
    get_md = fm.get_mla_metadata
    try:
        nparams = len(inspect.signature(get_md).parameters)
    except (TypeError, ValueError):
        nparams = 3
    if nparams == 0:  # newer releases: metadata object filled on the first call
        md, splits = get_md(), None
    else:  # (cache_seqlens, s_q * h_q // h_kv, h_kv)
        md, splits = get_md(inp.seq_lens, s_q * h, 1)
    t = b * s_q

    def call(layer: int):
        kc = inp.caches[layer].view(inp.num_blocks, inp.block_size, 1, d)
        o, _ = fm.flash_mla_with_kvcache(q4, kc, inp.block_table, inp.seq_lens, dv, md, splits,
                                         softmax_scale=inp.softmax_scale, causal=True)
        return o.reshape(t, h, dv)

    return [lambda i=i: call(i) for i in range(inp.layers)]


def _flashinfer(inp: DecodeInputs):
    fi = importlib.import_module("flashinfer")
    dev = inp.q.device
    lora = inp.kv_lora_rank
    blocks = [-(-s // inp.block_size) for s in inp.seq_lens_list]
    kv_indptr = torch.zeros(len(blocks) + 1, dtype=torch.int32)
    torch.cumsum(torch.tensor(blocks, dtype=torch.int32), 0, out=kv_indptr[1:])
    table = inp.block_table.cpu()
    kv_indices = torch.cat([table[i, :n] for i, n in enumerate(blocks)]).to(dev)
    if inp.query_start_loc is not None:
        qo_indptr = inp.query_start_loc
    else:
        qo_indptr = torch.arange(len(blocks) + 1, dtype=torch.int32, device=dev)
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    wrapper = fi.mla.BatchMLAPagedAttentionWrapper(workspace, backend="auto")
    wrapper.plan(qo_indptr, kv_indptr.to(dev), kv_indices, inp.seq_lens, inp.heads, lora,
                 inp.rope_dim, inp.block_size, inp.max_query_len > 1, inp.softmax_scale,
                 inp.q.dtype, inp.caches[0].dtype)
    q_nope, q_pe = inp.q[..., :lora].contiguous(), inp.q[..., lora:].contiguous()
    # separate contiguous latent / rope pools, as flashinfer's MLA page layout has them
    pools = [(c[..., :lora].contiguous(), c[..., lora:].contiguous()) for c in inp.caches]
    inp.extras["flashinfer"] = (workspace, wrapper, pools)

    def call(layer: int):
        ckv, kpe = pools[layer]
        return wrapper.run(q_nope, q_pe, ckv, kpe)

    return [lambda i=i: call(i) for i in range(inp.layers)]
