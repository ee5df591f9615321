"""Stand-in for the `train` + `finetune` stages in the stack test: what they leave behind.

A tiny Keras model that follows the saved-model contract (tests/tinymodel.py),
saved under ``models/<ds>/`` with ``candidate.json`` and the per-epoch
``history.csv``, so the real ``evaluate`` and ``register`` commands can run
against the stack. Replace it with ``python -m tasks train`` / ``finetune`` tasks
once those stages are part of the tiny pipeline budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("--root", required=True, type=Path)
    args = parser.parse_args(argv)

    from tasks.paths import DatasetPaths
    from tests.tinymodel import train_tiny_model, use_candidate, write_history

    paths = DatasetPaths.of(args.dataset, args.root)
    trained = args.root / ".standin-model.keras"
    train_tiny_model(epochs=4).save(trained)
    model_file = use_candidate(paths, trained)
    trained.unlink()
    write_history(paths, frozen_epochs=2, finetune_epochs=1)
    print(f"stand-in model: {model_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
