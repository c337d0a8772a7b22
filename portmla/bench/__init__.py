"""``python -m portmla bench``: timings of ``mla_decode`` per backend, with ceilings,
FLOP/byte counting per ANCHORS.md, a correctness gate against the reference backend,
and JSON / CSV / Markdown / roofline outputs. The entry point is ``portmla.bench.cli.main``.
"""

from .specs import BatchSpec, Group, parse_spec, parse_specs

__all__ = ["BatchSpec", "Group", "parse_spec", "parse_specs"]
