"""Batch specs in vLLM's benchmark grammar.

One group is ``<count>q<len>[k]s<len>[k]``: ``count`` sequences, each with ``q`` query
tokens and a KV length of ``s`` (including the query tokens). ``k`` multiplies by 1024.
``s`` may be left out (``2q2k``: a prefill, s = q); ``count`` may be left out (1).
Groups joined by ``_`` form one mixed batch: ``2q2k_32q1s1k`` is two 2048-token
prefills and 32 single-token decodes over 1024 cached tokens, in one call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

K = 1024
_NUM = r"(\d+)(k?)"
_GROUP = re.compile(rf"^(?:(\d+))?q{_NUM}(?:s{_NUM})?$")
GRAMMAR = "<count>q<len>[k]s<len>[k], groups joined by '_' (e.g. 128q1s4k, 16q4s1k, 2q2k_32q1s1k)"


@dataclass(frozen=True)
class Group:
    count: int  # sequences
    q_len: int  # query tokens per sequence
    kv_len: int  # KV length per sequence (mean when lengths vary), incl. the query tokens

    @property
    def text(self) -> str:
        s = "" if self.kv_len == self.q_len else f"s{_fmt(self.kv_len)}"
        return f"{self.count}q{_fmt(self.q_len)}{s}"


@dataclass(frozen=True)
class BatchSpec:
    text: str
    groups: tuple[Group, ...]

    @property
    def num_seqs(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def num_tokens(self) -> int:
        return sum(g.count * g.q_len for g in self.groups)

    @property
    def max_query_len(self) -> int:
        return max(g.q_len for g in self.groups)

    @property
    def max_kv_len(self) -> int:
        return max(g.kv_len for g in self.groups)

    @property
    def uniform(self) -> bool:
        """One group: every sequence has the same query length (what peers' APIs take)."""
        return len(self.groups) == 1


def _fmt(n: int) -> str:
    return f"{n // K}k" if n % K == 0 and n >= K else str(n)


def _num(digits: str, k: str) -> int:
    return int(digits) * (K if k else 1)


def parse_spec(text: str) -> BatchSpec:
    """Parse one batch spec; ``ValueError`` names the bad part and shows the grammar."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"batch spec {text!r} is empty (grammar: {GRAMMAR})")
    text = text.strip()
    groups = []
    for part in text.split("_"):
        m = _GROUP.match(part.lower())
        if m is None:
            raise ValueError(f"batch spec {text!r}: group {part!r} does not match the grammar "
                             f"{GRAMMAR}")
        count = int(m.group(1)) if m.group(1) is not None else 1
        q_len = _num(m.group(2), m.group(3))
        kv_len = _num(m.group(4), m.group(5)) if m.group(4) is not None else q_len
        if count < 1:
            raise ValueError(f"batch spec {text!r}: group {part!r} has count={count} (must be >= 1)")
        if q_len < 1:
            raise ValueError(f"batch spec {text!r}: group {part!r} has q={q_len} (must be >= 1)")
        if kv_len < q_len:
            raise ValueError(f"batch spec {text!r}: group {part!r} has s={kv_len} < q={q_len} "
                             f"(s is the KV length including the query tokens, so s >= q)")
        groups.append(Group(count, q_len, kv_len))
    return BatchSpec(text, tuple(groups))


def parse_specs(text: str) -> list[BatchSpec]:
    """A comma-separated list of batch specs."""
    parts = [p for p in (text or "").split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--specs {text!r} names no batch spec (grammar: {GRAMMAR})")
    return [parse_spec(p) for p in parts]
