"""Developer tools (benchmarks, the demo, local Airflow, generated data, offline weights).

Not part of the pipeline and not in the wheel; nothing in ``tasks`` outside
this package imports it.
"""
