"""The public operations, one module each: :mod:`.rewrite` (and ``inspect``) and :mod:`.calibrate`.

Each takes its options as values (one per concern) and returns a result object; :mod:`normact_onnx.api` is the
public facade that also accepts them as loose keywords. ``fold`` lives in :mod:`normact_onnx.deploy`,
``compare`` in :mod:`normact_onnx.comparison`, ``finetune`` in :mod:`normact_onnx.training`.
"""
