"""Volumes to tensors: MONAI dictionary-transform presets built from config."""
