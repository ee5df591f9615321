"""Scoring new images with a registered model version: what ``score`` and ``register`` share.

- :mod:`.drop`: a drop of new images (a folder, a zip, a URL, an ``s3://`` prefix)
  brought to a local folder and checked image by image, as ``validate`` checks the
  dataset (decode, size, mode, duplicates), into a manifest-like frame;
- :mod:`.reference`: the embeddings and prediction statistics each registered
  version keeps as its drift reference (made at register, read by ``score``).

The statistics live in :mod:`tasks.ml.drift`; the model card in
:mod:`tasks.tracking.card`.
"""
