"""The algorithm, NumPy only: read these first.

    split.py          which images train, validate and test (a stable hash of each file name)
    sampling.py       random training batches: a class first, then an image of it
    softmax_layer.py  the one layer we train: logits, softmax, cross-entropy, its gradient, one step
    train.py          the loop that ties them together
    checks.py         the input checks, done once by the caller (scikit-learn's check_* style)

Nothing here imports anything but NumPy and the standard library (tests/test_layout.py checks it).
"""
