"""Benchmarks of flask-orderhooks: the server harness (``benchmarks/run``), an
in-process micro-benchmark (:mod:`benchmarks.micro`), a profile
(:mod:`benchmarks.profiling`) and SQL round-trip counts
(:mod:`benchmarks.roundtrips`). See ``benchmarks/README.md``."""
