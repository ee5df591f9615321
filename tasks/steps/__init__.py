"""One module per pipeline stage (named as the DVC stage), each with ``run(cfg, paths)``.

A step reads and writes its stage's files, logs to MLflow and calls ``tasks.ml``.
"""
