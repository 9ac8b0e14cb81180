"""Deployment: the fused ``ai.normact`` kernel library and an ONNX Runtime session using it."""

from .library import (
    CPU_LIBRARY,
    CUDA_LIBRARY,
    LIBRARY_DIR_ENV,
    KernelLibraryNotFound,
    get_library_path,
    has_library,
    kernel_status,
    library_info,
)
from .session import InferenceSession

__all__ = [
    "CPU_LIBRARY",
    "CUDA_LIBRARY",
    "LIBRARY_DIR_ENV",
    "InferenceSession",
    "KernelLibraryNotFound",
    "get_library_path",
    "has_library",
    "kernel_status",
    "library_info",
]
