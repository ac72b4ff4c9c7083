"""Stage 2: datasets and tiling, text features, the MPerS segmenter, training, evaluation, prediction."""
