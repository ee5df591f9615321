"""Airflow in the test process gets a throwaway home, never ``~/airflow``.

Set before anything imports ``airflow`` (it reads AIRFLOW_HOME once, at import).
"""

from __future__ import annotations

import os
import tempfile

from tests.conftest import REPO

os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="tests-airflow-home-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
