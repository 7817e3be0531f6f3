"""Data: synthetic identity datasets, image folders, sampling and augmentation, the LFW pairs
files (``lfw_pairs``) and the per-identity balanced spherical k-means clusters (``clusters``) that
training, the identity index and evaluation share."""
