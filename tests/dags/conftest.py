"""Airflow in the test process gets a throwaway home, never ``~/airflow``.

Set before anything imports ``airflow`` (it reads AIRFLOW_HOME once, at import).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from tests.conftest import REPO, SESSION_FOLDERS

os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="tests-airflow-home-")
SESSION_FOLDERS.add(Path(os.environ["AIRFLOW_HOME"]).resolve())
atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], ignore_errors=True)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
