"""`mini_retrain demo`: the whole story on 16 real chest X-rays that ship with the package.

1. Retrain on 14 of them (7 normal, 7 pneumonia), with settings that suit so few images.
2. Label the 2 held-out X-rays: what the model was made for.
3. Label a photo of a cat and of a coffee cup: the original experiment's problem (a photo of a cow was called
   "normal (score = 0.99828)"). The scores alone look just as confident; the out-of-distribution check says otherwise.

Sixteen images are far too few for a real model: the point is to show every step, not to diagnose anything.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from mini_retrain.commands.label import format_result, label_images
from mini_retrain.pipeline.retrained_graph import load_retrained
from mini_retrain.commands.retrain import retrain
from mini_retrain.settings import RetrainSettings

DEMO_DATA = Path(__file__).resolve().parents[1] / "demo_data"  # mini_retrain/demo_data
HELD_OUT = ["pneumonia-demo/normal/NORMAL2-IM-1442-0001.jpeg", "pneumonia-demo/pneumonia/person1954_bacteria_4886.jpeg"]
PHOTOS = ["photos/chelsea.png", "photos/coffee.png"]


def prepare_demo_images(output_dir: Path) -> Path:
    """Copy the demo X-rays, minus the held-out two, into output_dir/images/{normal,pneumonia}."""
    image_dir = output_dir / "images"
    for source in sorted((DEMO_DATA / "pneumonia-demo").glob("*/*.jpeg")):
        relative = source.relative_to(DEMO_DATA).as_posix()
        if relative in HELD_OUT:
            continue
        target = image_dir / source.parent.name / source.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return image_dir


def run_demo(output_dir: Path = Path("mini_retrain_demo"), backbone: Path | None = None, device: str = "auto",
             how_many_training_steps: int = 500, log: Callable[[str], None] = print) -> list[dict]:
    """Retrain on the demo X-rays, then label held-out X-rays and two photos; return the label results."""
    output_dir = Path(output_dir)
    image_dir = prepare_demo_images(output_dir)
    log(f"== 1. Retrain on {image_dir} (14 X-rays; 2 more held out) ==")
    settings = RetrainSettings(
        image_dir=image_dir,
        output_graph=output_dir / "retrained_graph.onnx",
        output_labels=output_dir / "retrained_labels.txt",
        backbone=backbone,
        device=device,
        how_many_training_steps=how_many_training_steps,
        eval_step_interval=max(1, how_many_training_steps // 10),
        testing_percentage=25,
        validation_percentage=25,
        train_batch_size=16,
        validation_batch_size=-1,
    )
    retrain(settings, log=log)
    model = load_retrained(settings.output_graph, settings.output_labels, device, log)
    results = []
    for title, names in (("2. Label the held-out X-rays", HELD_OUT), ("3. Label two photos that are not X-rays", PHOTOS)):
        log(f"== {title} ==")
        for result in label_images(model, [DEMO_DATA / name for name in names], num_top_predictions=2):
            log("\n".join(format_result(result)))
            results.append(result)
    log("Sixteen images are far too few for a real model; see docs/shenzhen.md for the real experiment.")
    return results
