"""The runtime layer every stage stands on: errors, progress events, atomic writes, output folders and run
locks, the one resumable training loop, model bundles and the model store, devices, and the background-process
runner the Slicer modules use.

Owns: ``errors``, ``events``, ``atomic``, ``runlock``, ``outdir``, ``training`` (+ ``stop``: stop requests),
``bundle`` (its torch-free half: ``bundle_info``, which the Slicer panels read), ``model_store``, ``devices``,
``background``.
May import: the standard library, numpy/torch/safetensors and :mod:`separeg.registry`; never a stage package
(``io``, ``sis``, ``pretrain``, ``segment``, ``rt``, ``evaluate``, ``experiments``).
"""
