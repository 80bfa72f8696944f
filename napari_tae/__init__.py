"""napari-tae: unsupervised brain-lesion segmentation in FLAIR MRI with transformer autoencoders.

Implements Ghorbel et al., "Transformer based Models for Unsupervised Anomaly Segmentation in
Brain MR Images", BrainLes 2022, as a napari plugin with a headless core (I/O, preprocessing,
models, post-processing) shared by the plugin, the CLI and training. Research software, not a
medical device.
"""

__version__ = "0.1.0"

from napari_tae._reader import napari_get_reader
from napari_tae._sample_data import make_sample_data
from napari_tae._writer import write_image, write_labels

__all__ = ["AnomalyWidget", "make_sample_data", "napari_get_reader", "write_image", "write_labels"]


def __getattr__(name: str):
    # the widget imports Qt: loaded on first use so that headless users never import it
    if name == "AnomalyWidget":
        from napari_tae._widget import AnomalyWidget

        return AnomalyWidget
    raise AttributeError(f"module 'napari_tae' has no attribute {name!r}")
