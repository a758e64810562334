"""`mini_retrain demo` finds the images bundled with the package (the layout move once left it looking in
mini_retrain/commands/demo_data, which does not exist)."""

from mini_retrain.commands.demo import DEMO_DATA, HELD_OUT, PHOTOS, prepare_demo_images


def test_the_demo_finds_its_bundled_images(tmp_path):
    assert all((DEMO_DATA / name).is_file() for name in HELD_OUT + PHOTOS)
    image_dir = prepare_demo_images(tmp_path)
    copied = sorted(path.relative_to(image_dir).as_posix() for path in image_dir.glob("*/*.jpeg"))
    assert len(copied) == 14 and {path.split("/")[0] for path in copied} == {"normal", "pneumonia"}
    assert not {name.split("/", 1)[1] for name in HELD_OUT} & set(copied)  # the held-out two are not trained on
