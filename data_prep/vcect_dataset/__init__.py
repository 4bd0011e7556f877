"""TFDS builder `vcect_dataset`: the converter as a `tfds build` dataset (manual_dir = the DICOM root)."""

from data_prep.vcect_dataset.vcect_dataset import Builder

__all__ = ["Builder"]
