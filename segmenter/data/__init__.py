"""The data room: datasets and their files, tiling, raster reads, the tile index writer (`prepare`), demo scenes and
the training samples. It imports no other room of the segmenter."""
