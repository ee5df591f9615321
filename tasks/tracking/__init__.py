"""MLflow tracking: where the store is, the runs of a pipeline execution, the registry.

One module per concern; import from the module (this package re-exports nothing):

- :mod:`~tasks.tracking.store`: the store's location (``$MLFLOW_TRACKING_URI``,
  ``tracking.uri``, else the embedded SQLite store) and what to say when a
  tracking server cannot be reached or refuses a login.
- :mod:`~tasks.tracking.runs`: one experiment per dataset, one parent run per
  pipeline execution, one child run per phase; the headline figures on the parent.
- :mod:`~tasks.tracking.lineage`: what produced a run: git commit, DVC hashes,
  backbone, scheduler ids, overrides, the flat params, the manifest as its dataset.
- :mod:`~tasks.tracking.registry`: the registered model's name, its aliases
  (``@champion``, ``@challenger``, ``@previous``) and their history.
- :mod:`~tasks.tracking.models`: logging a model (the evaluated one, the registered
  candidate) and loading a logged model back.
- :mod:`~tasks.tracking.callback`: the Keras callback that logs each epoch (imports
  Keras: training stages only).
"""
