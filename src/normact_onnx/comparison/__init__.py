"""``compare``: run two models (or one model in two runtimes) on the same inputs and measure the difference.

This is how a user proves that a rewrite or a fold did what it claims: every
output is compared with error statistics and a pass/fail against ``atol``/``rtol``
(numpy ``allclose`` semantics, model A is the reference), and with ``sites=True``
each normalized site reports the mean and variance it actually sees on the data
(does normalization hold?). Statistics are accumulated batch by batch, so memory
does not grow with the number of batches (p99 uses a bounded sample).

Runtimes: ONNX Runtime with the kernel library registered when it is built
(what a deployment runs), or ``onnx.reference`` (model-local functions inlined
first) as an independent second opinion.

Modules: ``run`` (``compare``, ``measure_sites``), ``tally`` (two models side by side, one batch at a time),
``outputs`` (error statistics per output), ``sites`` (each normalized site's property), ``result`` (the report
and the printed tables), ``on_ray`` (the Ray workers). Loading and feeding models is :mod:`normact_onnx.data`'s.
"""

from .result import CompareResult
from .run import compare, measure_sites
from .sites import per_channel_moments, site_property

__all__ = ["CompareResult", "compare", "measure_sites", "per_channel_moments", "site_property"]
