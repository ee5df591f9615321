"""What ``dags/`` calls: project locations, run conf, workspaces, the DVC runner, GPU backends.

Standard library, ``yaml`` and the base modules at top level only: Airflow
imports this every time it parses the DAG files.
"""
