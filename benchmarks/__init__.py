"""Benchmarks of cascade-engine: live cost-quality runs, cost-quality curves, overhead, reports.

Run them as modules from the repository root (``.venv/bin/python -m benchmarks.live_cascade ...``);
``docs/benchmarks.md`` describes each one and the latest measured figures.
"""
