"""Stage 2 in rooms that follow a tile through it: ``data`` (datasets, tiling, prepare) -> ``text`` (caption features)
-> ``model`` (the MPerS segmenter, its presets) -> ``engine`` (training, evaluation, prediction, the run folder) ->
``cli`` (the ``segmenter`` command). A room imports only the rooms before it."""
