"""The napari plugin: reader, writer, sample data, widget, review state, demo and the manifest.

Everything in the project that imports napari or Qt lives in this folder; it uses the headless
core (:mod:`napari_tae.io`, :mod:`napari_tae.preprocess`, :mod:`napari_tae.inference`,
:mod:`napari_tae.postprocess`, :mod:`napari_tae.export`), never the other way round.
"""
