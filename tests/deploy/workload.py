"""A tiny tracked run through the project's own tracking code, for the stack test.

Run as a script (by an Airflow task in tests/deploy/test_stack.py) with
``MLFLOW_TRACKING_URI`` pointing at the MLflow server: it opens the pipeline's
parent and ``train`` child run with ``tasks.tracking.phase_run`` (so the lineage
tags, Airflow ids included, are the project's), logs a small scikit-learn model
and registers it as ``<dataset>-classifier`` with the ``champion`` alias.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    import mlflow
    import numpy as np
    from mlflow import MlflowClient
    from sklearn.linear_model import LogisticRegression

    from tasks.config import load_config
    from tasks.paths import DatasetPaths
    from tasks.tracking import phase_run

    cfg = load_config(args.params)
    paths = DatasetPaths.of(args.dataset, args.root)
    features = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1]])
    labels = np.array([0, 1, 0, 1])
    model = LogisticRegression().fit(features, labels)
    name = f"{args.dataset}-classifier"
    with phase_run(cfg, paths, "train", new_parent=True) as run:
        mlflow.log_metric("accuracy", float(model.score(features, labels)))
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            registered_model_name=name,
            input_example=features[:1],
            pip_requirements=["scikit-learn"],
        )
    version = info.registered_model_version
    MlflowClient().set_registered_model_alias(name, "champion", str(version))
    args.out.write_text(
        json.dumps(
            {
                "run_id": run.info.run_id,
                "experiment_id": run.info.experiment_id,
                "model_id": info.model_id,
                "registered_model": name,
                "version": int(version),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
