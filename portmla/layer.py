"""The vLLM-style MLA attention layer: absorbed decode + compute-friendly prefill.

Decode requests (``query_len <= decode_threshold``) run in the latent space:
``ql_nope = q_nope @ W_UK`` -> ``mla_decode`` over the 576-wide cache -> ``@ W_UV``.
Prefill requests run MHA (qk head dim nope+rope, v head dim v): the new tokens attend
to each other causally, the cached context is gathered in chunks of at most
``context_chunk_tokens`` tokens, each chunk attended without a mask, and the partial
results are merged by LSE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import ops
from .kv_formats import canonical_format
from .validate import check_tensor


def _ints(name: str, values) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 1-D integer tensor or a sequence of ints "
                             f"(got dtype {values.dtype}, shape {tuple(values.shape)})")
        return [int(v) for v in values.tolist()]
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}[{i}]={v!r} (must be an int)")
        out.append(v)
    return out


@dataclass
class MLABatch:
    """Host and device metadata of one step: one entry per request, in the caller's order."""

    query_lens: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor  # [B, max_blocks] int32
    block_size: int
    query_start_loc: torch.Tensor  # [B+1] int32, device
    seq_lens_tensor: torch.Tensor  # [B] int32, device
    slot_mapping: torch.Tensor  # [T] int64, device
    _parts: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def num_reqs(self) -> int:
        return len(self.query_lens)

    @classmethod
    def build(cls, query_lens, seq_lens, block_table, block_size, device) -> MLABatch:
        """query_lens / seq_lens: ints or int tensors; seq_lens include this step's tokens."""
        ql, sl = _ints("query_lens", query_lens), _ints("seq_lens", seq_lens)
        if len(ql) != len(sl):
            raise ValueError(f"query_lens has {len(ql)} entries and seq_lens {len(sl)} (must match)")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} (must be an int >= 1)")
        device = torch.device(device)
        check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, shape=(len(ql),))
        block_table = block_table.to(device)
        for i, (q, s) in enumerate(zip(ql, sl)):
            if q < 0 or s < q:
                raise ValueError(f"request {i}: query_len={q}, seq_len={s} "
                                 f"(need 0 <= query_len <= seq_len)")
            if -(-s // block_size) > block_table.shape[1]:
                raise ValueError(f"request {i}: seq_len={s} needs {-(-s // block_size)} blocks of "
                                 f"{block_size}, block_table has {block_table.shape[1]} columns")
        qsl = torch.tensor([0] + ql, dtype=torch.int64).cumsum(0).to(torch.int32)
        # slot of every new token: its position seq_len - query_len + j in its request
        req = torch.repeat_interleave(torch.arange(len(ql)), torch.tensor(ql, dtype=torch.int64))
        pos = (torch.arange(sum(ql)) - qsl[:-1].long()[req]
               + (torch.tensor(sl) - torch.tensor(ql)).long()[req])
        bt_cpu = block_table.cpu().long()
        slots = bt_cpu[req, pos // block_size] * block_size + pos % block_size
        return cls(ql, sl, block_table, block_size, qsl.to(device),
                   torch.tensor(sl, dtype=torch.int32, device=device), slots.to(device))

    def split(self, decode_threshold: int):
        """(decode request ids, prefill request ids), each in the caller's order."""
        if decode_threshold not in self._parts:
            dec = [i for i, q in enumerate(self.query_lens) if 0 < q <= decode_threshold]
            pre = [i for i, q in enumerate(self.query_lens) if q > decode_threshold]
            self._parts[decode_threshold] = (dec, pre)
        return self._parts[decode_threshold]

    def token_index(self, reqs: list[int]) -> torch.Tensor:
        """Token rows (into the step's [T, ...] inputs) of the given requests, in order."""
        starts = [0]
        for q in self.query_lens:
            starts.append(starts[-1] + q)
        idx = [t for r in reqs for t in range(starts[r], starts[r + 1])]
        return torch.tensor(idx, dtype=torch.int64, device=self.slot_mapping.device)


class MLAAttention:
    """DeepSeek-style MLA attention over a paged latent cache (see module docstring).

    kv_b_proj_weight ``[num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]``: per head,
    the ``qk_nope_head_dim`` rows of ``W_UK`` first, then the ``v_head_dim`` rows of ``W_UV``.
    """

    def __init__(self, num_heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
                 kv_b_proj_weight, *, softmax_scale=None, kv_cache_dtype="auto", backend="auto",
                 decode_threshold=1, context_chunk_tokens=None):
        for name, v in (("num_heads", num_heads), ("kv_lora_rank", kv_lora_rank),
                        ("qk_nope_head_dim", qk_nope_head_dim), ("qk_rope_head_dim", qk_rope_head_dim),
                        ("v_head_dim", v_head_dim), ("decode_threshold", decode_threshold)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} (must be an int >= 1)")
        if context_chunk_tokens is not None and (not isinstance(context_chunk_tokens, int)
                                                 or context_chunk_tokens < 1):
            raise ValueError(f"context_chunk_tokens={context_chunk_tokens!r} (must be None or an int >= 1)")
        rows = num_heads * (qk_nope_head_dim + v_head_dim)
        check_tensor("kv_b_proj_weight", kv_b_proj_weight, dtypes=(torch.bfloat16, torch.float16,
                                                                     torch.float32),
                     ndim=2, shape=(rows, kv_lora_rank))
        self.num_heads, self.kv_lora_rank = num_heads, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / math.sqrt(qk_nope_head_dim + qk_rope_head_dim))
        self.kv_cache_dtype = canonical_format(kv_cache_dtype)
        self.backend = backend
        self.decode_threshold = decode_threshold
        self.context_chunk_tokens = context_chunk_tokens
        self.kv_b_proj_weight = kv_b_proj_weight
        # a forced backend runs every op it has; ops it lacks (e.g. prefill on a decode-only
        # native backend) go through auto dispatch
        if backend == "auto":
            self._op_backend = {}
        else:
            from .dispatch import get_backend

            ops_of = get_backend(backend).OPS
            self._op_backend = {op: (backend if op in ops_of else "auto") for op in
                                ("mla_decode", "concat_and_cache_mla", "gather_cache",
                                 "merge_attn_states", "mla_prefill_attention")}
        w = kv_b_proj_weight.view(num_heads, qk_nope_head_dim + v_head_dim, kv_lora_rank)
        self.w_uk = w[:, :qk_nope_head_dim, :]  # [H, nope, L]
        self.w_uv = w[:, qk_nope_head_dim:, :]  # [H, v, L]

    # ---------------------------------------------------------------------------------

    def forward(self, q, kv_c_normed, k_pe, kv_cache, batch: MLABatch, k_scale=None, out=None):
        """q ``[T, H, nope+rope]``, kv_c_normed ``[T, L]``, k_pe ``[T, 1, R]`` or ``[T, R]``.

        Writes the new tokens into ``kv_cache``, then returns ``[T, H * v_head_dim]`` in q's
        dtype, rows in the input order.
        """
        h, nope, rope = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        t = batch.num_tokens
        check_tensor("q", q, dtypes=(torch.bfloat16, torch.float16), ndim=3,
                     shape=(t, h, nope + rope), last_contiguous=True)
        check_tensor("kv_c_normed", kv_c_normed, dtypes=(q.dtype,), ndim=2,
                     shape=(t, self.kv_lora_rank), device=q.device)
        if out is not None:
            check_tensor("out", out, dtypes=(q.dtype,), ndim=2, shape=(t, h * self.v_head_dim),
                         device=q.device, contiguous=True)
        else:
            out = torch.empty(t, h * self.v_head_dim, dtype=q.dtype, device=q.device)
        ops.concat_and_cache_mla(kv_c_normed, k_pe, kv_cache, batch.slot_mapping,
                                 self.kv_cache_dtype, k_scale,
                                 backend=self._backend("concat_and_cache_mla"))
        dec, pre = batch.split(self.decode_threshold)
        view = out.view(t, h, self.v_head_dim)
        if dec:
            idx = batch.token_index(dec)
            view[idx] = self._decode(q[idx], kv_cache, batch, dec, k_scale)
        if pre:
            idx = batch.token_index(pre)
            view[idx] = self._prefill(q[idx], kv_c_normed[idx], k_pe.reshape(t, -1)[idx], kv_cache,
                                      batch, pre, k_scale)
        return out

    __call__ = forward

    def _backend(self, op: str) -> str:
        return self._op_backend.get(op, self.backend)

    def _decode(self, q, kv_cache, batch, reqs, k_scale):
        nope = self.qk_nope_head_dim
        ql_nope = torch.einsum("thn,hnl->thl", q[..., :nope], self.w_uk.to(q.dtype))
        qlens = [batch.query_lens[r] for r in reqs]
        dev = q.device
        ridx = torch.tensor(reqs, dtype=torch.int64, device=dev)
        qsl = None
        if max(qlens) > 1:
            qsl = torch.tensor([0] + qlens, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
        latent = ops.mla_decode((ql_nope.contiguous(), q[..., nope:].contiguous()), kv_cache,
                                batch.block_table[ridx], batch.seq_lens_tensor[ridx],
                                softmax_scale=self.softmax_scale, kv_lora_rank=self.kv_lora_rank,
                                kv_cache_dtype=self.kv_cache_dtype, k_scale=k_scale,
                                query_start_loc=qsl, backend=self._backend("mla_decode"),
                                max_query_len=max(qlens))
        return torch.einsum("thl,hvl->thv", latent, self.w_uv.to(q.dtype))

    def _kv_up(self, kv_c, k_pe):
        """Latent rows -> per-head k ``[n, H, nope+rope]`` and v ``[n, H, v]``."""
        kv = torch.einsum("nl,hdl->nhd", kv_c, self.kv_b_proj_weight.view(
            self.num_heads, -1, self.kv_lora_rank).to(kv_c.dtype))
        k_nope, v = kv[..., :self.qk_nope_head_dim], kv[..., self.qk_nope_head_dim:]
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.num_heads, -1)], dim=-1)
        return k.contiguous(), v.contiguous()

    def _prefill(self, q, kv_c, k_pe, kv_cache, batch, reqs, k_scale):
        dev = q.device
        qlens = [batch.query_lens[r] for r in reqs]
        ctx = [batch.seq_lens[r] - batch.query_lens[r] for r in reqs]
        cu_q = torch.tensor([0] + qlens, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
        k, v = self._kv_up(kv_c, k_pe.to(q.dtype))
        out, lse = ops.mla_prefill_attention(q, k, v, cu_q, cu_q, max(qlens), max(qlens),
                                             softmax_scale=self.softmax_scale, causal=True,
                                             return_lse=True,
                                             backend=self._backend("mla_prefill_attention"))
        total_ctx = sum(ctx)
        if total_ctx == 0:
            return out
        ridx = torch.tensor(reqs, dtype=torch.int64, device=dev)
        table = batch.block_table[ridx]
        per_seq = max(ctx) if self.context_chunk_tokens is None else \
            max(1, self.context_chunk_tokens // len(reqs))
        for start in range(0, max(ctx), per_seq):
            lens = [max(0, min(per_seq, c - start)) for c in ctx]
            n = sum(lens)
            if n == 0:
                continue
            lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
            starts_t = torch.full((len(reqs),), start, dtype=torch.int32, device=dev)
            gathered = ops.gather_cache(kv_cache, table, lens_t, kv_cache_dtype=self.kv_cache_dtype,
                                        scale=k_scale, out_dtype=q.dtype, seq_starts=starts_t,
                                        backend=self._backend("gather_cache"),
                                        kv_lora_rank=self.kv_lora_rank,
                                        total_tokens=n)
            ck, cv = self._kv_up(gathered[:, :self.kv_lora_rank], gathered[:, self.kv_lora_rank:])
            cu_k = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
            c_out, c_lse = ops.mla_prefill_attention(q, ck, cv, cu_q, cu_k, max(qlens), max(lens),
                                                     softmax_scale=self.softmax_scale, causal=False,
                                                     return_lse=True,
                                                     backend=self._backend("mla_prefill_attention"))
            out, lse = ops.merge_attn_states(c_out, c_lse, out, lse,
                                             backend=self._backend("merge_attn_states"))
        return out
