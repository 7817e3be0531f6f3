"""The runtime layer below every stage: checkpoints, torch.distributed helpers, device and
mixed-precision selection, seeding, atomic file output and the FAISS CPU/GPU policy.

Nothing here imports a stage package (data, models, losses, align, embed, index, eval, train,
study): runtime sits below all of them (tests/test_layering.py checks it). The model loaded from a
checkpoint for inference (``LoadedModel``, ``load_model``) builds a backbone and reads images, so
it lives above data, in :mod:`facepipe.models.loaded`. The modules are imported on their own
(``facepipe.runtime.io``...): this package imports nothing, so that reading an embeddings folder
or a report does not import torch.
"""
