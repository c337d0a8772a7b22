"""Device-side balanced split schedule of the persistent decode (``decode._decode_sched_kernel``).

Computed on the device from ``seq_lens`` on every call (one program, ``_schedule_kernel``), so
a CUDA graph replays it with whatever lengths the batch has then; nothing is read back to the
host and the scratch is sized from host-known bounds. Same semantics as the CUDA backend's
schedule (``csrc_cuda/common/schedule.cuh``), written for any Triton target.

Work is counted in *units*: sequence ``b`` costs ``cdiv(seq_lens[b], UNIT)`` KV tiles (``UNIT``
= the decode kernel's ``BLOCK_N``) plus ``FIXED`` units for its fixed cost (Q load, pipeline
fill, epilogue). The sequences' units are laid end to end and part ``k`` of ``P`` takes units
``[k T, (k + 1) T)`` with ``T = cdiv(total, P)``: every part (one program per row tile) gets
the same amount of work whatever the mix of lengths. A sequence that a part boundary cuts is
computed in *pieces*, each writing float32 partials + LSE to its own slot; the others write
their output directly, and ``combine._combine_pieces_kernel`` merges the pieces.

Scratch (one int64 allocation, see ``sched_scratch``; sizes from ``B`` and ``P`` only):

* ``cum[b]``: units before sequence ``b`` (``b = 0 .. B``); ``cum[B + 1] = T``.
* ``piece[2 b]``: first partial slot of sequence ``b``, ``-1`` when it is one piece;
  ``piece[2 b + 1]``: its piece count (int32, ``2 B`` values).
* ``cut[0]``: how many sequences are cut; ``cut[1 + k]``: the ``k``-th of them, in sequence
  order (int32, ``1 + max_cuts(B, P)`` values; entries past the count are not written). The
  pieces combine's grid is sized by that bound, not by ``B``.

Bounds: a sequence is cut when a part boundary ``k T`` (``k = 1 .. P - 1``) falls strictly
inside its KV tiles; the sequences' tiles do not overlap, so each boundary cuts at most one
sequence: at most ``min(B, P - 1)`` cut sequences. A boundary adds one piece and makes at most
one more sequence cut, so the cut sequences hold at most ``2 (P - 1)`` pieces (slots).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

SCHED_CHUNK = 1024  # sequences per step of the schedule's scans (any batch size: a carry)


@triton.jit
def _seq_units(seq_lens_ptr, b, num_seqs, fixed, UNIT: tl.constexpr):
    """Units of sequences ``b`` ([CHUNK] int64; 0 past ``num_seqs``)."""
    ok = b < num_seqs
    n = tl.maximum(tl.load(seq_lens_ptr + b, mask=ok, other=0), 0).to(tl.int64)
    return tl.where(ok, (n + UNIT - 1) // UNIT + fixed, 0)


@triton.jit
def _schedule_kernel(seq_lens_ptr, cum_ptr, piece_ptr, cut_ptr, num_seqs, num_parts, fixed,
                     UNIT: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr = False):
    """One program: ``cum`` (int64 inclusive prefix of the units), ``piece`` and ``cut``
    (int32). Two passes over chunks of ``CHUNK`` sequences with a carry: the total first
    (for ``T``), then the prefix, the pieces and the cut list (a prefix count of the cut
    sequences gives each its place); the second pass recomputes the units instead of reading
    back what it stored (no read-after-write across threads of the program)."""
    if PDL:  # the decode grid may start now; it waits (griddepcontrol.wait) before reading cum
        gdc_launch_dependents()
    offs = tl.arange(0, CHUNK)
    total = tl.sum(tl.zeros((CHUNK,), tl.int64), 0)
    for base in range(0, num_seqs, CHUNK):
        total += tl.sum(_seq_units(seq_lens_ptr, base + offs, num_seqs, fixed, UNIT), 0)
    per_part = tl.maximum((total + num_parts - 1) // num_parts, 1)
    tl.store(cum_ptr, total * 0)
    tl.store(cum_ptr + num_seqs + 1, per_part)
    carry = total * 0
    slots = total * 0
    cuts = (total * 0).to(tl.int32)
    for base in range(0, num_seqs, CHUNK):
        b = base + offs
        ok = b < num_seqs
        units = _seq_units(seq_lens_ptr, b, num_seqs, fixed, UNIT)
        incl = carry + tl.cumsum(units, 0)
        tl.store(cum_ptr + 1 + b, incl, mask=ok)
        first = incl - units + fixed  # unit of the sequence's KV tile 0
        tiles = units - fixed
        pieces = tl.where(tiles > 0, (first + tiles - 1) // per_part - first // per_part + 1, 1)
        cut_pieces = tl.where(ok & (pieces > 1), pieces, 0)
        slot_incl = slots + tl.cumsum(cut_pieces, 0)
        b2 = 2 * b.to(tl.int64)
        tl.store(piece_ptr + b2, tl.where(cut_pieces > 0, slot_incl - cut_pieces, -1).to(tl.int32), mask=ok)
        tl.store(piece_ptr + b2 + 1, pieces.to(tl.int32), mask=ok)
        is_cut = (cut_pieces > 0).to(tl.int32)
        tl.store(cut_ptr + cuts + tl.cumsum(is_cut, 0), b, mask=is_cut > 0)  # 1 + cuts before b
        carry += tl.sum(units, 0)
        slots += tl.sum(cut_pieces, 0)
        cuts += tl.sum(is_cut, 0)
    tl.store(cut_ptr, cuts)


@triton.jit
def first_seq(cum_ptr, num_seqs, lo):
    """The first sequence whose units reach past unit ``lo`` (``num_seqs`` if none): binary
    search over ``cum`` with scalar loads."""
    left = (lo * 0).to(tl.int32)
    right = left + num_seqs
    while left < right:
        mid = (left + right) // 2
        past = tl.load(cum_ptr + mid + 1) > lo
        right = tl.where(past, mid, right)
        left = tl.where(past, left, mid + 1)
    return left


def max_cuts(num_seqs: int, parts: int) -> int:
    """Most sequences the schedule can cut: one per part boundary, at most every sequence."""
    return max(0, min(num_seqs, parts - 1))


def sched_scratch(num_seqs: int, parts: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cum, piece, cut)`` views of one int64 allocation: ``num_seqs + 2`` int64, then
    ``2 num_seqs`` and ``1 + max_cuts(num_seqs, parts)`` int32 values (host-known sizes)."""
    n_cut = 1 + max_cuts(num_seqs, parts)
    s = torch.empty(2 * num_seqs + 2 + (n_cut + 1) // 2, dtype=torch.int64, device=device)
    i32 = s[num_seqs + 2:].view(torch.int32)
    return s[:num_seqs + 2], i32[:2 * num_seqs], i32[2 * num_seqs:2 * num_seqs + n_cut]


def num_slots(parts: int) -> int:
    """Partial slots the schedule may use (>= 1 so the buffer always exists)."""
    return max(1, 2 * (parts - 1))


def launch_schedule(seq_lens, cum, piece, cut, num_parts: int, fixed: int, unit: int, warps: int,
                    pdl: bool = False) -> None:
    b = seq_lens.shape[0]
    _schedule_kernel[(1,)](seq_lens, cum, piece, cut, b, num_parts, fixed, UNIT=unit,
                           CHUNK=min(SCHED_CHUNK, triton.next_power_of_2(max(b, 16))),
                           PDL=pdl, num_warps=warps)
