"""Ahead-of-time export of MoE models, converted or not (the foe:: ops they reach included):
ONNX files that run in onnxruntime (`to_onnx`, needs the `export` extra: onnx, onnxscript) and
AOTInductor packages (`to_aoti`, `load_aoti`)."""
from __future__ import annotations

from .aoti import load_aoti, to_aoti


def to_onnx(model, inputs, path) -> str:
    """See onnx_export.to_onnx."""
    try:
        from .onnx_export import to_onnx as export
    except ImportError as err:
        raise ImportError(f"ONNX export needs onnx and onnxscript ({err}); pip install 'foe-compile[export]'") from err
    return export(model, inputs, path)


__all__ = ["load_aoti", "to_aoti", "to_onnx"]
