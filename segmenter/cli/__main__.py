"""``python -m segmenter.cli`` (as ``torchrun ... -m segmenter.cli train`` runs it): the ``segmenter`` command."""

from segmenter.cli import app

app()
