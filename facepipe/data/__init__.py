"""Data: synthetic identity datasets, image folders, sampling and augmentation."""
