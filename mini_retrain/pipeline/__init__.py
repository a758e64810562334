"""Files -> pixels -> bottlenecks -> one ONNX file, in this order:

    image_lists.py      one subfolder per class
    images.py, dicom.py decode and resize (distortions.py: retrain.py's random distortions)
    backbone.py         Inception v3 under onnxruntime: pixels -> bottlenecks (pool_3, or earlier blocks' averages)
    bottlenecks.py      the cache of bottlenecks, keyed by file content, one store per layer
    cluster.py          the same bottlenecks computed by the workers of a Dask cluster (--dask_scheduler)
    dataset.py          steps 1-3 of retrain.py together: images, splits, bottlenecks
    export.py           the retrained graph: backbone + final layer + softmax + OOD and population distances
    retrained_graph.py  that graph read back, and new images prepared for it
"""
