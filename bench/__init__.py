"""Benchmarks for Stadsbeeld: ``python -m bench [names...]``; never part of the test run.

Each ``bench/bench_*.py`` module registers its benchmarks with :func:`bench.common.register`;
results go to ``bench/results/<name>.json``. See ``bench/README.md``.
"""
