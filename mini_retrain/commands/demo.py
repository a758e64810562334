"""`mini_retrain demo`: the whole story on 16 real chest X-rays that ship with the package.

1. Retrain on 14 of them (7 normal, 7 pneumonia), with settings that suit so few images.
2. Label the 2 held-out X-rays: what the model was made for.
3. Label a photo of a cat and of a coffee cup: the original experiment's problem (a photo of a cow was called
   "normal (score = 0.99828)"). The scores alone look just as confident; the out-of-distribution check says otherwise.
4. Say what the numbers mean: a few sentences on this run's own figures, and the next command to try.

Sixteen images are far too few for a real model: the point is to show every step, not to diagnose anything. Every
file the demo uses is copied into its folder, so the paths it prints are short and can be opened.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from mini_retrain.commands.label import format_result, label_images
from mini_retrain.commands.retrain import retrain
from mini_retrain.pipeline.retrained_graph import load_retrained
from mini_retrain.settings import RetrainSettings

DEMO_DATA = Path(__file__).resolve().parents[1] / "demo_data"  # mini_retrain/demo_data
HELD_OUT = ["pneumonia-demo/normal/NORMAL2-IM-1442-0001.jpeg", "pneumonia-demo/pneumonia/person1954_bacteria_4886.jpeg"]
PHOTOS = ["photos/chelsea.png", "photos/coffee.png"]


def _copy(source: Path, target: Path) -> Path:
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return target


def prepare_demo_images(output_dir: Path) -> Path:
    """Copy the demo X-rays, minus the held-out two, into output_dir/images/{normal,pneumonia}; the held-out two
    into output_dir/held_out/{normal,pneumonia} and the photos into output_dir/photos."""
    image_dir = output_dir / "images"
    for source in sorted((DEMO_DATA / "pneumonia-demo").glob("*/*.jpeg")):
        relative = source.relative_to(DEMO_DATA).as_posix()
        folder = output_dir / "held_out" if relative in HELD_OUT else image_dir
        _copy(source, folder / source.parent.name / source.name)
    for name in PHOTOS:
        _copy(DEMO_DATA / name, output_dir / name)
    return image_dir


def run_demo(output_dir: Path = Path("mini_retrain_demo"), backbone: Path | None = None, device: str = "auto",
             how_many_training_steps: int = 500, log: Callable[[str], None] = print,
             progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Retrain on the demo X-rays, then label held-out X-rays and two photos; return the label results."""
    output_dir = Path(output_dir)
    image_dir = prepare_demo_images(output_dir)
    log(f"mini_retrain demo: retrain the last layer of Inception v3 on 14 chest X-rays, then label 2 X-rays it never "
        f"saw and 2 photos. Everything goes to {output_dir}/.")
    log(f"== 1. Retrain on {image_dir}/ (7 normal, 7 pneumonia) ==")
    settings = RetrainSettings(
        image_dir=image_dir,
        output_graph=output_dir / "retrained_graph.onnx",
        backbone=backbone,
        device=device,
        how_many_training_steps=how_many_training_steps,
        eval_step_interval=max(1, how_many_training_steps // 10),
        testing_percentage=25,
        validation_percentage=25,
        train_batch_size=16,
        validation_batch_size=-1,
    )
    evaluation = retrain(settings, log=log, progress=progress)
    model = load_retrained(settings.output_graph, settings.output_labels, device, log)
    results = []
    sections = (("2. Label the 2 held-out X-rays", [output_dir / "held_out" / Path(name).parent.name / Path(name).name
                                                     for name in HELD_OUT]),
                ("3. Label two photos that are not X-rays", [output_dir / name for name in PHOTOS]))
    for title, paths in sections:
        log(f"== {title} ==")
        for result in label_images(model, paths, num_top_predictions=2, log=log):
            log("\n".join(format_result(result)))
            results.append(result)
    log("== 4. What this run shows ==")
    for line in explain_run(evaluation, results[:len(HELD_OUT)], results[len(HELD_OUT):], settings):
        log(line)
    return results


def explain_run(evaluation: dict, held_out: list[dict], photos: list[dict], settings: RetrainSettings) -> list[str]:
    """A few sentences on this run's own numbers, for someone who has never read a confusion matrix."""
    lines = []
    n = evaluation.get("n", 0)
    if n:
        accuracy = evaluation["accuracy"]
        low, high = accuracy["ci"]
        lines.append(f"- The test set held {n} X-rays. With so few, one answer more or less right moves the "
                     f"accuracy by {100 / n:.0f} points, and its 95% interval ({100 * low:.0f}-{100 * high:.0f}%) covers most of "
                     "what is possible: no figure from 14 images can be trusted.")
        auc = evaluation.get("roc_auc", {}).get("estimate")
        if auc is not None:
            gap = (" A high AUC next to a low accuracy means the ranking is right but the cut is not, which a few "
                   "images cannot fix." if auc - accuracy["estimate"] >= 0.2 else "")
            lines.append(f"- ROC AUC {auc:.3f} and accuracy {100 * accuracy['estimate']:.0f}% measure different "
                         "things: the AUC asks whether every pneumonia film scores above every normal one (the ranking), the "
                         f"accuracy whether each film falls on the right side of the 50% cut.{gap}")
    trained_on = sum(row["training"] for row in evaluation.get("run", {}).get("classes", {}).values())
    for result in held_out:
        if "predictions" not in result:
            continue
        truth = Path(result["image"]).parent.name
        top = result["predictions"][0]
        if top["label"] != truth:
            lines.append(f"- The held-out {truth} film {Path(result['image']).name} was called {top['label']} "
                         f"(score = {top['score']:.5f}): wrong, and confident. A score is how far the film lies on "
                         f"one side of the boundary the {trained_on} training films drew, not the chance of being "
                         "right.")
    flagged = [Path(result["image"]).name for result in photos if result.get("out_of_distribution")]
    if flagged:
        lines.append(f"- The photos got scores like any X-ray, but {' and '.join(flagged)} "
                     f"{'was' if len(flagged) == 1 else 'were'} flagged as unlike the training images: that warning, "
                     "not the score, is what tells you not to trust the answer.")
    lines.append(f"- Files: {settings.output_graph} (the model), and every number above with its interval in "
                 f"{Path(settings.output_graph).with_suffix('.metrics.json')}.")
    lines.append("Next: retrain on your own images, one subfolder per class, with a report of the run:")
    lines.append("  mini_retrain retrain --image_dir YOUR_FOLDER --report report/")
    lines.append("(docs/shenzhen.md walks through a real data set of 662 X-rays.)")
    return lines
