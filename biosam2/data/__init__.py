"""Data: the nnU-Net-style dataset format, image/volume I/O, normalisation, converters."""
