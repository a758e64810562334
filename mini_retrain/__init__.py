"""mini_retrain: TensorFlow's retrain.py and label_image, rebuilt so every step can be read.

From Python (mini_retrain/api.py):

    import mini_retrain
    evaluation = mini_retrain.retrain("lungs/", how_many_training_steps=500)   # retrain.py's flags as keywords
    results = mini_retrain.label("retrained_graph.onnx", ["new_xray.png"])      # one dict per image, as label --json
    mini_retrain.explain("retrained_graph.onnx", "new_xray.png", output="heat.png")
    report = mini_retrain.evaluate("retrained_graph.onnx", "other_hospital/")  # a labelled folder from elsewhere

Data flows one way, and the folders are the reading order:

    core/        the algorithm in NumPy: split, sampling, softmax_layer, train (read these first)
    build/       the pretrained Inception v3 as an ONNX file, once
    pipeline/    files -> images -> bottlenecks (cached) -> the exported graph
    evaluation/  metrics with confidence intervals, out-of-distribution check, heat maps, report
    commands/    one module per subcommand; cli.py parses the flags, api.py is the same from Python
"""

__version__ = "0.1.0"

API = ("retrain", "label", "explain", "evaluate")
__all__ = [*API, "RetrainSettings", "__version__"]


def __getattr__(name: str):
    """mini_retrain.retrain etc., imported on first use: `import mini_retrain` loads neither NumPy nor onnxruntime."""
    if name in API:
        from mini_retrain import api

        return getattr(api, name)
    if name == "RetrainSettings":
        from mini_retrain.settings import RetrainSettings

        return RetrainSettings
    raise AttributeError(f"module 'mini_retrain' has no attribute {name!r}")
