"""The runtime layer below every stage: checkpoints and the loaded model (``LoadedModel``,
``load_model``), torch.distributed helpers, device and mixed-precision selection, seeding, atomic
file output and the FAISS CPU/GPU policy.

Nothing here imports a stage package (align, data, models, losses, train, embed, index, eval)
except :mod:`facepipe.runtime.model`, which builds a checkpoint's backbone and reads its images.
The modules are imported on their own (``facepipe.runtime.io``...): this package imports
nothing, so that reading an embeddings folder or a report does not import torch.
"""
