"""Tiny generated image datasets for the tests (the generator lives in ``tasks.dev.synthetic``,
which ``make demo`` uses too)."""

from tasks.dev.synthetic import LAYOUTS, make_archive, make_image, make_tree, tiny_params

__all__ = ["LAYOUTS", "make_archive", "make_image", "make_tree", "tiny_params"]
