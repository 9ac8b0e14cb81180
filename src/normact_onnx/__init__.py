"""normact-onnx: normalized activations for any ONNX model.

Find activation sites in exported models, rewrite them into statically
normalized or ANAct-calibrated form (a portable model-local function that ONNX
Runtime runs as a fused kernel when the library is registered), and deploy.
"""

__version__ = "0.1.0"

# after __version__: the passes import it
from .comparison import compare as compare
from .deploy import fold as fold
