"""mini_retrain: TensorFlow's retrain.py and label_image, rebuilt so every step can be read.

Data flows one way:

    files -> images -> bottlenecks -> final layer -> metrics

`images` decodes and resizes, `backbone` runs the pretrained Inception v3 (ONNX, onnxruntime)
to get the 2048-d bottleneck of each image, `bottlenecks` caches them, `split` and `sampling`
choose which images train, validate and test, `softmax_layer` is the one layer we train, and
`train` is the loop that ties them together.
"""

__version__ = "0.1.0"
