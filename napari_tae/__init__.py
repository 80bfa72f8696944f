"""napari-tae: unsupervised brain-lesion segmentation in FLAIR MRI with transformer autoencoders.

Implements Ghorbel et al., "Transformer based Models for Unsupervised Anomaly Segmentation in
Brain MR Images", BrainLes 2022, as a napari plugin with a headless core (I/O, preprocessing,
models, post-processing) shared by the plugin, the CLI and training. Research software, not a
medical device. The napari plugin lives in :mod:`napari_tae.plugin`; nothing outside that folder
imports napari or Qt (README, Architecture).
"""

__version__ = "0.1.0"
