"""The data a model is run on, in one place: what a model must be fed, where the batches come from, and how.

``inputs`` (a model's input specs), ``options`` (``DataOptions``: the data source a call names, as one value),
``synthetic`` (the one rule for synthetic inputs), ``readers`` and ``rows`` (files, folders, Parquet, images →
checked batches), ``feeding`` (a model loaded and run on those batches, in ONNX Runtime or ``onnx.reference``)
and ``ray`` (the generic Ray Data plumbing: cluster, work plan, feeding workers, tree merge). Calibration,
comparison, ``fold`` and training consume this package; it imports nothing above the model layer
(docs/architecture.md §2). Nothing is imported here, so each module loads only what it needs.
"""
