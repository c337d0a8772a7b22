"""The torch reference backend: the executable spec of every op.

Pure torch on any device, float32 accumulation, one Python loop over sequences.
Supports every KV format, block size, stride, head count and query length. It reads
sequence lengths on the host, so it cannot run inside CUDA-graph capture.
"""

from __future__ import annotations

import torch

from ..kv_formats import dequantize_entries, quantize_entries
from .base import Backend


def _positions_to_slots(block_table_row: torch.Tensor, positions: torch.Tensor, block_size: int):
    return block_table_row[positions // block_size].long(), positions % block_size


def gather_entries(kv_cache, block_table_row, positions, block_size):
    """Cache entries ``[n, entry]`` (storage dtype) of token ``positions`` of one sequence."""
    blocks, offs = _positions_to_slots(block_table_row, positions, block_size)
    return kv_cache[blocks, offs]


class ReferenceBackend(Backend):
    NAME = "reference"
    PLATFORMS = ("cuda", "rocm", "xpu", "cpu")
    DTYPES = (torch.bfloat16, torch.float16, torch.float32)
    CUDA_GRAPHS = False

    def concat_and_cache_mla(self, p, kv_c, k_pe, kv_cache, slot_mapping, scale):
        c = p.cache
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        if slots.numel() == 0:
            return
        kv = torch.cat([kv_c[keep].float(), k_pe.reshape(k_pe.shape[0], -1)[keep].float()], dim=1)
        entries = quantize_entries(kv, c.kv_format, c.kv_lora_rank, scale, kv_cache.dtype,
                                   p.platform.fp8_dtype)
        kv_cache[slots // c.block_size, slots % c.block_size] = entries

    def gather_cache(self, p, kv_cache, block_table, seq_lens, seq_starts, cu_seq_lens, scale, out):
        c = p.cache
        lens = seq_lens.tolist()
        starts = seq_starts.tolist() if seq_starts is not None else [0] * len(lens)
        cu = cu_seq_lens.tolist()
        for b, n in enumerate(lens):
            if n == 0:
                continue
            pos = torch.arange(starts[b], starts[b] + n, device=kv_cache.device)
            entries = gather_entries(kv_cache, block_table[b], pos, c.block_size)
            vals = dequantize_entries(entries, c.kv_format, c.kv_lora_rank, scale, p.platform.fp8_dtype)
            out[cu[b]:cu[b] + n] = vals.to(out.dtype)

    def mla_decode(self, p, q, kv_cache, block_table, seq_lens, query_start_loc, softmax_scale,
                   k_scale, out, lse):
        c = p.cache
        lens = seq_lens.tolist()
        if query_start_loc is None:
            qsl = list(range(len(lens) + 1))
        else:
            qsl = query_start_loc.tolist()
        lora = c.kv_lora_rank
        for b, s in enumerate(lens):
            t0, t1 = qsl[b], qsl[b + 1]
            n = t1 - t0
            if n == 0:
                continue
            pos = torch.arange(s, device=q.device)
            entries = gather_entries(kv_cache, block_table[b], pos, c.block_size)
            kv = dequantize_entries(entries, c.kv_format, lora, k_scale, p.platform.fp8_dtype)
            qb = q[t0:t1].float()  # [n, H, L+R]
            scores = torch.einsum("nhd,sd->nhs", qb, kv) * softmax_scale
            # query j of n sees positions 0 .. s - n + j
            last = (s - n) + torch.arange(n, device=q.device)
            masked = pos.view(1, -1) > last.view(-1, 1)  # [n, s]
            scores = scores.masked_fill(masked.unsqueeze(1), float("-inf"))
            m = torch.logsumexp(scores, dim=-1)  # [n, H]
            probs = torch.exp(scores - m.unsqueeze(-1))
            out[t0:t1] = torch.einsum("nhs,sd->nhd", probs, kv[:, :lora]).to(out.dtype)
            if lse is not None:
                lse[t0:t1] = m

    def merge_attn_states(self, p, prefix_out, prefix_lse, suffix_out, suffix_lse, out, out_lse):
        merged_out, merged_lse = merge_reference(prefix_out, prefix_lse, suffix_out, suffix_lse)
        out.copy_(merged_out.to(out.dtype))
        if out_lse is not None:
            out_lse.copy_(merged_lse)

    def mla_prefill_attention(self, p, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                              out, lse):
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        group = p.num_heads // p.num_kv_heads
        for b in range(p.num_seqs):
            sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
            if sq == 0:
                continue
            qb = q[cq[b]:cq[b + 1]].float()
            kb = k[ck[b]:ck[b + 1]].float().repeat_interleave(group, dim=1)
            vb = v[ck[b]:ck[b + 1]].float().repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", qb, kb) * softmax_scale
            if causal:
                qi = torch.arange(sq, device=q.device).view(-1, 1) + (sk - sq)
                kj = torch.arange(sk, device=q.device).view(1, -1)
                scores = scores.masked_fill((kj > qi).unsqueeze(0), float("-inf"))
            m = torch.logsumexp(scores, dim=-1)  # [H, sq]
            safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            probs = torch.exp(scores - safe.unsqueeze(-1))
            ob = torch.einsum("hqk,khd->qhd", probs, vb)
            out[cq[b]:cq[b + 1]] = ob.to(out.dtype)
            if lse is not None:
                lse[cq[b]:cq[b + 1]] = m.transpose(0, 1)


def merge_reference(prefix_out, prefix_lse, suffix_out, suffix_lse):
    """LSE-weighted merge in float32. Both sides empty (-inf) gives out 0 and lse -inf."""
    pl, sl = prefix_lse.float(), suffix_lse.float()
    m = torch.maximum(pl, sl)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wp, ws = torch.exp(pl - m_safe), torch.exp(sl - m_safe)
    total = wp + ws
    denom = torch.where(total > 0, total, torch.ones_like(total))
    zero = torch.zeros((), dtype=torch.float32, device=prefix_out.device)
    # a side with weight 0 contributes 0 even when its output is garbage (NaN / inf)
    o = (torch.where((wp > 0).unsqueeze(-1), prefix_out.float() * (wp / denom).unsqueeze(-1), zero)
         + torch.where((ws > 0).unsqueeze(-1), suffix_out.float() * (ws / denom).unsqueeze(-1), zero))
    return o, m_safe + torch.log(total)
