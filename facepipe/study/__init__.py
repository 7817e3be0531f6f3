"""Studies as a library: many methods x seeds x sweep settings fine-tuned from one shared
pre-training, resumable across sessions and checkouts, read out with confidence intervals.

- :mod:`facepipe.study.spec`: the YAML spec (``configs/studies/``) and each run's config;
- :mod:`facepipe.study.runner`: the resumable runner (claims, resume, kept results, fp16 backbones);
- :mod:`facepipe.study.readouts`: every readout of a run from one embedding pass;
- :mod:`facepipe.study.mechanisms`: whether each method's mechanism acted, from a run's log;
- :mod:`facepipe.study.report`: tables, paired tests, plots and the README section.

The CLI: ``facepipe study run|status|report SPEC``.
"""
