"""Every public op is a torch.library custom op: torch.compile(fullgraph=True) traces it."""

from __future__ import annotations

import pytest
import torch
from mla_cases import make_decode_case, rel_err

import portmla as pm


def _step(q, cache, table, lens, kv_c, k_pe, slots, pq, pk, pv, cu):
    pm.concat_and_cache_mla(kv_c, k_pe, cache, slots)
    out, lse = pm.mla_decode(q, cache, table, lens, softmax_scale=0.1, return_lse=True)
    po, plse = pm.mla_prefill_attention(pq, pk, pv, cu, cu, 8, 8, softmax_scale=0.1,
                                        return_lse=True)
    mo, mlse = pm.merge_attn_states(po, plse, po, plse)
    g = pm.gather_cache(cache, table, lens, total_tokens=57)
    return out * 2, lse, mo, mlse, g

@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_fullgraph_compile_matches_eager(compiler, device):
    case = make_decode_case([40, 17], [1, 1], heads=4, block_size=16, device=device)
    kv_c = torch.randn(2, 512, device=device, dtype=torch.bfloat16)
    k_pe = torch.randn(2, 64, device=device, dtype=torch.bfloat16)
    # overwrite the last token of each sequence (a decode step writes then reads)
    slots = torch.stack([case.block_table[0, 39 // 16].long() * 16 + 39 % 16,
                         case.block_table[1, 16 // 16].long() * 16 + 16 % 16])
    pq = torch.randn(8, 2, 192, device=device, dtype=torch.bfloat16)
    pk, pv = torch.randn(8, 2, 192, device=device, dtype=torch.bfloat16), \
        torch.randn(8, 2, 128, device=device, dtype=torch.bfloat16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    cache_c = case.cache.clone()
    args = (case.q, case.block_table, case.seq_lens, kv_c, k_pe, slots, pq, pk, pv, cu)
    eager = _step(case.q, case.cache, *args[1:])
    compiled = torch.compile(_step, fullgraph=True, backend=compiler)(case.q, cache_c, *args[1:])
    assert torch.equal(cache_c.view(torch.int16), case.cache.view(torch.int16)), "cache write lost"
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-6 if not torch.isinf(b).any() else torch.equal(a, b)
