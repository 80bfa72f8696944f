"""Training and evaluation of napari-tae checkpoints (``python -m training``)."""
