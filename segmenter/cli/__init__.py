"""The ``segmenter`` command: data preparation, demo data, model listing, training, evaluation, prediction.

The typer app and what its commands share are in :mod:`segmenter.cli.app`; the commands, one module per room they
drive (:mod:`segmenter.cli.data`, :mod:`segmenter.cli.models`, :mod:`segmenter.cli.engine`), register on it when
imported here.
"""

from segmenter.cli import data, engine, models
from segmenter.cli.app import app, progress
from segmenter.cli.models import preset_rows, render_presets

__all__ = ["app", "data", "engine", "models", "preset_rows", "progress", "render_presets"]
