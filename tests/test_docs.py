"""The documentation stays true to the code (docs/*.md, README.md, models/README.md).

Static checks, each a small function that returns a list of problems (so the tests at the bottom can also show that
every check catches what it is for):

- every backticked dotted name `mini_retrain.x.y` resolves: import the modules along the path, then getattr;
- a link whose text is such a name, [`mini_retrain.x.y`](../mini_retrain/x.py), points at the file of module x;
- every relative Markdown link points at an existing file in the repository, and a #anchor into a Markdown file at
  one of its headings (GitHub's heading ids);
- every `mini_retrain <subcommand> --flag ...` in a shell code block or in inline code names a real subcommand of
  mini_retrain.cli.build_parser() and only flags that subcommand accepts (spelled in full: argparse would accept an
  abbreviation, a reader copying it should not have to rely on that);
- every inline `--flag ...` is a flag of some subcommand, and every inline `retrain --flag ...` one of retrain;
- a link to `file.py#L123` lands on the line that defines the function it names (in algorithm.md every function
  link does), and the line counts quoted beside files stay within 10% of the truth.

And the docs' code and output stay true: the gradient check in algorithm.md runs, and the output shenzhen.md shows
for `mini_retrain evaluate` is what the command prints.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

from mini_retrain.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md", ROOT / "models" / "README.md"]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}

DOTTED_NAME = re.compile(r"^mini_retrain(\.[A-Za-z_]\w*)+$")
LINK = re.compile(r"!?\[((?:[^\[\]`]|`[^`]*`)*)\]\(([^)\s]+)\)")  # [text](target), text may hold `code`
INLINE_CODE = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
COMMAND_SPAN = re.compile(r"^(python3? -m )?mini_retrain\s+\S")  # inline code that is a whole command
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")


# ---------------------------------------------------------------------------------------------------- Markdown


def split_markdown(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(prose, [(language, code)]): fenced blocks are returned apart; prose keeps its lines, code lines blanked.

    Indented code blocks (4 spaces after a blank line) are blanked from the prose too and not returned.
    """
    prose: list[str] = []
    blocks: list[tuple[str, str]] = []
    fence, language, code = None, "", []
    previous_blank = True
    in_indented = False
    for line in text.splitlines():
        if fence is not None:
            if line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
                blocks.append((language, "\n".join(code)))
                fence = None
            else:
                code.append(line)
            prose.append("")
            continue
        opening = FENCE.match(line)
        if opening:
            fence, language, code = opening.group(1), opening.group(2).lower(), []
            prose.append("")
            previous_blank = False
            continue
        indented = line.startswith("    ") or line.startswith("\t")
        if indented and (previous_blank or in_indented):
            in_indented = True
            prose.append("")
            continue
        if line.strip():
            in_indented = False
        previous_blank = not line.strip()
        prose.append(line)
    if fence is not None:
        raise ValueError(f"an unclosed {fence} code block")
    return "\n".join(prose), blocks


def heading_ids(prose: str) -> set[str]:
    """GitHub's ids of the headings: lower case, punctuation dropped, spaces -> '-', repeats get -1, -2, ..."""
    ids: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose.splitlines():
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


# ---------------------------------------------------------------------------------------------------- checks


def resolve(dotted: str) -> tuple[object, Path]:
    """The object a dotted name names, and the file of the innermost module on its path.

    "mini_retrain.core.softmax_layer.gradients" -> (the function, .../mini_retrain/core/softmax_layer.py).
    Raises ImportError or AttributeError when a part does not exist.
    """
    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    module_file = Path(obj.__file__)
    for depth in range(1, len(parts)):
        name = ".".join(parts[: depth + 1])
        is_package = isinstance(obj, ModuleType) and hasattr(obj, "__path__")
        if is_package and importlib.util.find_spec(name) is not None:
            obj = importlib.import_module(name)
            module_file = Path(obj.__file__)
        elif hasattr(obj, parts[depth]):
            obj = getattr(obj, parts[depth])
        else:
            raise AttributeError(f"{'.'.join(parts[:depth])} has no {parts[depth]!r}")
    return obj, module_file


def check_dotted_names(prose: str) -> list[str]:
    problems = []
    for code in INLINE_CODE.findall(prose):
        if DOTTED_NAME.match(code.strip()):
            try:
                resolve(code.strip())
            except (ImportError, AttributeError) as error:
                problems.append(f"`{code}` does not resolve ({error})")
    return problems


def check_links(prose: str, doc: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for text, target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc.resolve()
        if not path.is_relative_to(root.resolve()):
            problems.append(f"link ({target}) leaves the repository")
            continue
        if not path.exists():
            problems.append(f"link ({target}) points at {path.relative_to(root.resolve())}, which does not exist")
            continue
        if anchor and path.suffix == ".md":
            if anchor not in heading_ids(split_markdown(path.read_text(encoding="utf-8"))[0]):
                problems.append(f"link ({target}): {path.name} has no heading with the id #{anchor}")
        name = text.strip()
        if name.startswith("`") and name.endswith("`") and DOTTED_NAME.match(name.strip("`")):
            try:
                _, module_file = resolve(name.strip("`"))
            except (ImportError, AttributeError):
                continue  # check_dotted_names reports it
            if path != module_file.resolve():
                problems.append(f"link [{name}]({target}) should point at the file of its module, "
                                f"{module_file.resolve().relative_to(root.resolve())}")
    return problems


def check_anchors(prose: str, doc: Path, require: bool = False) -> list[str]:
    """A link [`mini_retrain.x.f`](../mini_retrain/x.py#L12) lands on the line that defines f (`def f`, `class f`,
    `f = ...`). require=True: every link to a function, class or constant must carry such an anchor."""
    problems = []
    for text, target in LINK.findall(prose):
        name, (path_part, _, anchor) = text.strip().strip("`"), target.partition("#")
        if not DOTTED_NAME.match(name) or not path_part.endswith(".py"):
            continue
        try:
            obj, _ = resolve(name)
        except (ImportError, AttributeError):
            continue  # check_dotted_names reports it
        if not anchor:
            if require and not isinstance(obj, ModuleType):
                problems.append(f"link [{text}]({target}) should land on the line of {name.split('.')[-1]} (#L<n>)")
            continue
        lines = (doc.parent / path_part).resolve().read_text(encoding="utf-8").splitlines()
        number = int(anchor[1:]) if re.fullmatch(r"L\d+", anchor) else 0
        definition = re.compile(rf"^\s*((async )?def|class) {re.escape(name.split('.')[-1])}\b|"
                                rf"^{re.escape(name.split('.')[-1])}\s*[:=]")
        if not 1 <= number <= len(lines) or not definition.match(lines[number - 1]):
            found = [n for n, line in enumerate(lines, 1) if definition.match(line)]
            problems.append(f"link [{text}]({target}): line {anchor} of {path_part} does not define "
                            f"{name.split('.')[-1]}" + (f" (line {found[0]} does)" if found else ""))
    return problems


def check_line_counts(prose: str, doc: Path, tolerance: float = 0.1) -> list[str]:
    """Line counts quoted beside a file: "[`x.py`](../mini_retrain/x.py) (142)" or "`x.py` (~140 lines" (a file of
    mini_retrain/core/) stay within `tolerance` of the file's real length."""
    quoted = [(doc.parent / path, int(count)) for path, count in
              re.findall(r"\]\(([^)#\s]+\.py)\)\s*\((\d+)\)", prose)]
    quoted += [(ROOT / "mini_retrain" / "core" / name, int(count))
               for name, count in re.findall(r"`(\w+\.py)` \(~(\d+) lines", prose)]
    problems = []
    for path, count in quoted:
        if not path.is_file():
            problems.append(f"{path.name} ({count} lines) does not exist")
            continue
        real = len(path.read_text(encoding="utf-8").splitlines())
        if abs(count - real) > tolerance * real:
            problems.append(f"{path.resolve().relative_to(ROOT)} is said to have {count} lines but has {real}")
    return problems


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{subcommand name: its parser}, read from the parser's subparsers action."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("mini_retrain's parser has no subcommands")


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell snippet, as token lists: continuation lines joined, comments dropped,
    split at && || ; | > < ( ), a leading "$ " prompt and VAR=value assignments removed."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        line = re.sub(r"^\s*\$\s+", "", line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # unbalanced quotes: not shell
            continue
        command: list[str] = []
        for token in tokens + [";"]:
            if token and all(c in "&|;<>()" for c in token):
                while command and re.match(r"^[A-Za-z_]\w*=", command[0]):
                    command.pop(0)
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(token)
    return commands


def check_commands(code: str, parsers: dict[str, argparse.ArgumentParser],
                   top: argparse.ArgumentParser) -> list[str]:
    """Every `mini_retrain SUB --flag` (or `python -m mini_retrain SUB ...`) uses a real subcommand and flags."""
    problems = []
    for tokens in shell_commands(code):
        if tokens[:3] in (["python", "-m", "mini_retrain"], ["python3", "-m", "mini_retrain"]):
            tokens = tokens[2:]
        if not tokens or tokens[0] != "mini_retrain":
            continue
        shown = " ".join(tokens)
        if len(tokens) == 1 or tokens[1].startswith("-"):
            for flag in (t.split("=")[0] for t in tokens[1:] if t.startswith("-")):
                if flag not in top._option_string_actions:
                    problems.append(f"`{shown}`: mini_retrain has no option {flag}")
            continue
        subcommand = tokens[1]
        if subcommand not in parsers:
            problems.append(f"`{shown}`: {subcommand!r} is not a subcommand (there are {', '.join(parsers)})")
            continue
        accepted = parsers[subcommand]._option_string_actions
        for token in tokens[2:]:
            flag = token.split("=")[0]
            if token.startswith("-") and not re.fullmatch(r"-\d[\d.]*", token) and flag not in accepted:
                problems.append(f"`{shown}`: `mini_retrain {subcommand}` has no flag {flag}")
    return problems


def check_shell(prose: str, blocks: list[tuple[str, str]], parsers: dict[str, argparse.ArgumentParser],
                top: argparse.ArgumentParser) -> list[str]:
    problems = []
    for language, code in blocks:
        if language in SHELL_LANGUAGES:
            problems += check_commands(code, parsers, top)
    for code in INLINE_CODE.findall(prose):
        if COMMAND_SPAN.match(code):
            problems += check_commands(code, parsers, top)
    return problems


def check_inline_flags(prose: str, parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """Flags quoted without `mini_retrain` in front: `--learning_rate 0.01` must be a flag of some subcommand,
    `retrain --report DIR` a flag of that subcommand. Other commands' flags (`pip download --no-deps`) are skipped."""
    known = {flag for parser in parsers.values() for flag in parser._option_string_actions}
    problems = []
    for code in INLINE_CODE.findall(prose):
        words = code.split()
        if words[0].startswith("--"):
            problems += [f"`{code}`: no subcommand has a flag {flag}" for flag in FLAG.findall(code) if flag not in known]
        elif words[0] in parsers and len(words) > 1 and words[1].startswith("--"):
            accepted = parsers[words[0]]._option_string_actions
            problems += [f"`{code}`: `mini_retrain {words[0]}` has no flag {flag}"
                         for flag in FLAG.findall(code) if flag not in accepted]
    return problems


# ---------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def cli():
    top = build_parser()
    return top, subcommand_parsers(top)


def _documents():
    return [pytest.param(path, id=str(path.relative_to(ROOT))) for path in DOC_FILES]


def test_the_documents_exist():
    names = {path.relative_to(ROOT).as_posix() for path in DOC_FILES if path.is_file()}
    assert {"docs/README.md", "docs/algorithm.md", "docs/shenzhen.md", "README.md", "models/README.md"} <= names


@pytest.mark.parametrize("doc", _documents())
def test_dotted_names_resolve(doc):
    prose, _ = split_markdown(doc.read_text(encoding="utf-8"))
    assert check_dotted_names(prose) == []


@pytest.mark.parametrize("doc", _documents())
def test_relative_links_exist(doc):
    prose, _ = split_markdown(doc.read_text(encoding="utf-8"))
    assert check_links(prose, doc) == []


@pytest.mark.parametrize("doc", _documents())
def test_commands_and_flags_are_real(doc, cli):
    top, parsers = cli
    prose, blocks = split_markdown(doc.read_text(encoding="utf-8"))
    assert check_shell(prose, blocks, parsers, top) == []
    assert check_inline_flags(prose, parsers) == []


@pytest.mark.parametrize("doc", _documents())
def test_code_spans_do_not_break_across_lines(doc):
    """Markdown allows `a
    b`, but then every later span of the paragraph would be paired wrongly by the checks above: keep each on one line."""
    prose, _ = split_markdown(doc.read_text(encoding="utf-8"))
    odd = [f"line {number}: {line}" for number, line in enumerate(prose.splitlines(), 1) if line.count("`") % 2]
    assert odd == []


def test_docs_index_links_every_page():
    prose, _ = split_markdown((DOCS / "README.md").read_text(encoding="utf-8"))
    linked = {(DOCS / target.partition("#")[0]).resolve() for _, target in LINK.findall(prose)}
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "README.md" and p.resolve() not in linked]
    assert missing == []


def test_the_algorithm_page_links_its_code():
    """Each numbered section of algorithm.md names the code that implements it."""
    prose, _ = split_markdown((DOCS / "algorithm.md").read_text(encoding="utf-8"))
    sections = re.split(r"^## ", prose, flags=re.MULTILINE)[1:]
    assert len(sections) >= 10
    for section in sections:
        links = [text for text, _ in LINK.findall(section) if DOTTED_NAME.match(text.strip("`"))]
        assert links, f"section '{section.splitlines()[0]}' links no mini_retrain function"


@pytest.mark.parametrize("doc", _documents())
def test_anchored_links_land_on_the_definition(doc):
    prose, _ = split_markdown(doc.read_text(encoding="utf-8"))
    assert check_anchors(prose, doc, require=doc.name == "algorithm.md" and doc.parent == DOCS) == []


@pytest.mark.parametrize("doc", _documents())
def test_quoted_line_counts_are_near_the_truth(doc):
    prose, _ = split_markdown(doc.read_text(encoding="utf-8"))
    assert check_line_counts(prose, doc) == []


def test_the_reading_order_is_given_where_a_learner_starts():
    """README's second paragraph and algorithm.md's first section name every core file, in reading order, with its
    length; the box also lists every other module of the package."""
    core = {path.name for path in (ROOT / "mini_retrain" / "core").glob("*.py") if path.name != "__init__.py"}
    readme = split_markdown((ROOT / "README.md").read_text(encoding="utf-8"))[0].split("\n\n")
    second = readme[2]  # title, the one-line summary, then this
    named = re.findall(r"`(\w+\.py)` \(~\d+ lines", second)
    assert set(named) == core and named[:4] == ["split.py", "sampling.py", "softmax_layer.py", "train.py"]
    total = int(re.search(r"about (\d+) lines", second)[1])
    real = sum(len((ROOT / "mini_retrain" / "core" / name).read_text().splitlines()) for name in core)
    assert abs(total - real) <= 0.1 * real, (total, real)
    prose = split_markdown((DOCS / "algorithm.md").read_text(encoding="utf-8"))[0]
    box = re.split(r"^## ", prose, flags=re.MULTILINE)[1]
    assert box.startswith("Read in this order")
    listed = re.findall(r"\]\(\.\./(mini_retrain/[\w/]+\.py)\)\s*\(\d+\)", box)
    assert listed[:len(named)] == [f"mini_retrain/core/{name}" for name in named]
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "mini_retrain").rglob("*.py")
               if path.name not in ("__init__.py", "__main__.py") and path.parent.name != "demo_data"}
    assert set(listed) == modules


def test_the_anchor_and_count_checks_catch_mistakes():
    doc = DOCS / "imaginary.md"
    right = [line for line in (ROOT / "mini_retrain/core/softmax_layer.py").read_text().splitlines()]
    line = next(n for n, text in enumerate(right, 1) if text.startswith("def gradients("))
    good = f"[`mini_retrain.core.softmax_layer.gradients`](../mini_retrain/core/softmax_layer.py#L{line})"
    assert check_anchors(good, doc, require=True) == []
    assert check_anchors(good.replace(f"#L{line}", f"#L{line + 1}"), doc) == [
        f"link [`mini_retrain.core.softmax_layer.gradients`](../mini_retrain/core/softmax_layer.py#L{line + 1}): "
        f"line L{line + 1} of ../mini_retrain/core/softmax_layer.py does not define gradients (line {line} does)"]
    assert len(check_anchors(good.replace(f"#L{line}", ""), doc, require=True)) == 1
    assert check_anchors(good.replace(f"#L{line}", ""), doc) == []  # only algorithm.md requires anchors
    assert check_anchors("[`mini_retrain.core.split`](../mini_retrain/core/split.py)", doc, require=True) == []
    real = len(right)
    assert check_line_counts(f"[`softmax_layer.py`](../mini_retrain/core/softmax_layer.py) ({real})", doc) == []
    assert check_line_counts(f"`softmax_layer.py` (~{round(real * 1.05)} lines", doc) == []
    assert check_line_counts(f"`softmax_layer.py` (~{round(real * 1.2)} lines", doc) == [
        f"mini_retrain/core/softmax_layer.py is said to have {round(real * 1.2)} lines but has {real}"]


def test_every_shell_block_of_the_walkthrough_uses_mini_retrain_commands(cli):
    """The walkthrough's commands are checked above only if the parser below finds them: make sure it does."""
    top, parsers = cli
    _, blocks = split_markdown((DOCS / "shenzhen.md").read_text(encoding="utf-8"))
    used = {tokens[1] for language, code in blocks if language in SHELL_LANGUAGES
            for tokens in shell_commands(code) if tokens[0] == "mini_retrain" and len(tokens) > 1}
    assert {"prepare", "retrain", "label", "evaluate", "explain", "crossval", "sweep"} <= used


def _defaults(parsers: dict[str, argparse.ArgumentParser], subcommand: str) -> dict:
    return {action.dest: action.default for action in parsers[subcommand]._actions}


def test_numbers_quoted_from_the_code(cli):
    """Defaults and constants the pages quote, rebuilt from the code: a changed default shows up here."""
    import inspect
    import math

    from mini_retrain.core import recalibrate, softmax_layer, split
    from mini_retrain.evaluation import metrics, ood, population
    from mini_retrain.pipeline import image_lists

    _, parsers = cli
    retrain, sweep, label = _defaults(parsers, "retrain"), _defaults(parsers, "sweep"), _defaults(parsers, "label")
    max_plus_one = split.MAX_NUM_IMAGES_PER_CLASS + 1
    assert max_plus_one & (max_plus_one - 1) == 0  # a power of two, so it can be written 2**k - 1
    quantile = inspect.signature(ood.fit_ood_model).parameters["quantile"].default
    bins = inspect.signature(metrics.calibration).parameters["bins"].default
    expected = {
        "algorithm.md": [
            f"MAX = 2**{int(math.log2(max_plus_one))} - 1",
            f"`--validation_percentage {retrain['validation_percentage']:g}`",
            f"`--testing_percentage {retrain['testing_percentage']:g}`",
            f"`--train_batch_size` = {retrain['train_batch_size']}",
            f"(`--learning_rate`, {retrain['learning_rate']:g})",
            f"(--how_many_training_steps {retrain['how_many_training_steps']})",
            f"every --eval_step_interval steps ({retrain['eval_step_interval']})",
            f"(`--validation_batch_size {retrain['validation_batch_size']}`)",
            f"standard deviation {softmax_layer.INIT_STDDEV:g}",
            f"fewer than {image_lists.MIN_IMAGES_PER_CLASS} images",
            f"into {bins} equal-width bins",
            f"K = min({ood.MAX_FOLDS}, n)",
            f"THRESHOLD_MARGIN = {ood.THRESHOLD_MARGIN:g}, q = {quantile:g}",
            f"(`POPULATION_LAYER = {population.POPULATION_LAYER}`, `COMPONENTS = {population.COMPONENTS}`)",
            f"the {population.QUANTILE * 100:g}th percentile of held-out distances",
        ],
        "accuracy.md": [
            f"(one subfolder per label, at least {recalibrate.MIN_IMAGES_PER_CLASS} each)",
            f"the default {recalibrate.L2:g} was fixed before",
        ],
        "shenzhen.md": [
            f"{retrain['how_many_training_steps']} steps, learning rate {retrain['learning_rate']:g}, batches of "
            f"{retrain['train_batch_size']}, {retrain['validation_percentage']:g}% of images for validation and "
            f"{retrain['testing_percentage']:g}% for testing",
            f"--learning_rates {sweep['learning_rates']} --how_many_training_steps {sweep['steps_grid']} "
            f"--class_balancing {sweep['balancing_grid']}",
            f"default `--num_top_predictions {label['num_top_predictions']}`",
        ],
    }
    for page, phrases in expected.items():
        text = " ".join((DOCS / page).read_text(encoding="utf-8").split())  # line breaks as spaces
        missing = [phrase for phrase in phrases if phrase not in text]
        assert missing == [], f"{page} no longer matches the code: {missing}"


# The checks must be able to fail: each is shown a small document with one mistake of its kind.

def test_the_checks_catch_mistakes(cli):
    top, parsers = cli
    doc = DOCS / "imaginary.md"  # never written: the links are resolved from docs/
    text = "\n".join([
        "# Title",
        "See [`mini_retrain.core.softmax_layer.no_such_function`](../mini_retrain/core/softmax_layer.py).",
        "And [`mini_retrain.core.softmax_layer.softmax`](../mini_retrain/core/split.py), [gone](missing.md),",
        "[anchor](algorithm.md#no-such-heading), [fine](algorithm.md#1-the-pipeline-at-a-glance), `--no_such_flag`,",
        "`label --report x` (a flag of retrain, not of label), `pip download --no-deps x` (not ours).",
        "Inline `mini_retrain retrain --image_dir x --learning_rat 0.1`.",
        "",
        "```bash",
        "mini_retrain retrain --image_dir lungs --validation_batch_size -1 \\",
        "    --how_many_training_step 10   # a comment --not_a_flag",
        "pip install . && mini_retrain nosuch --x 1",
        "mini_retrain label --graph g.onnx --image a.png --json > out.json",
        "```",
        "",
        "```text",
        "mini_retrain nosuch  (output, not a command: not checked)",
        "```",
    ])
    prose, blocks = split_markdown(text)
    assert check_dotted_names(prose) == [
        "`mini_retrain.core.softmax_layer.no_such_function` does not resolve "
        "(mini_retrain.core.softmax_layer has no 'no_such_function')"]
    links = check_links(prose, doc)
    assert len(links) == 3, links
    assert any("should point at the file of its module" in p for p in links)
    assert any("missing.md" in p for p in links) and any("#no-such-heading" in p for p in links)
    shell = check_shell(prose, blocks, parsers, top)
    assert len(shell) == 3, shell
    assert any("--how_many_training_step" in p for p in shell)
    assert any("'nosuch' is not a subcommand" in p for p in shell)
    assert any("--learning_rat" in p for p in shell)
    assert check_inline_flags(prose, parsers) == ["`--no_such_flag`: no subcommand has a flag --no_such_flag",
                                                  "`label --report x`: `mini_retrain label` has no flag --report"]


def test_a_link_to_the_wrong_module_file_is_caught():
    doc = ROOT / "docs" / "imaginary.md"
    prose = "[`mini_retrain.core.softmax_layer.softmax`](../mini_retrain/core/split.py)"
    assert check_links(prose, doc) == [
        "link [`mini_retrain.core.softmax_layer.softmax`](../mini_retrain/core/split.py) should point at the file of its "
        "module, mini_retrain/core/softmax_layer.py"]
    assert check_links(prose.replace("split.py", "softmax_layer.py"), doc) == []


def test_heading_ids_follow_github():
    ids = heading_ids("# 4. The train / validation / test split\n## Lay it out: `prepare`\n## Same\n## Same\n")
    assert ids == {"4-the-train--validation--test-split", "lay-it-out-prepare", "same", "same-1"}


# ---------------------------------------------------------------------------------------------------- snippets


def _python_blocks(doc: Path) -> list[str]:
    return [code for language, code in split_markdown(doc.read_text(encoding="utf-8"))[1] if language == "python"]


def test_the_gradient_check_in_algorithm_md_runs():
    blocks = _python_blocks(DOCS / "algorithm.md")
    assert blocks, "algorithm.md lost its finite-difference check"
    for code in blocks:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, "docs/algorithm.md", "exec"), {"__name__": "__doc_snippet__"})


def _shape(line: str) -> str:
    """A line with its numbers blanked: what the docs and the command must share (the numbers differ)."""
    return re.sub(r"[+-]?[0-9][0-9.]*", "#", line.strip())


def test_the_evaluate_output_in_shenzhen_md_is_what_evaluate_prints(tiny_backbone, tmp_path, monkeypatch):
    """Section 9's example output, line by line, against a real run (a tiny graph on the demo X-rays, laid out as
    lungs_montgomery/abnormal and normal): each documented line, up to its first "...", numbers blanked, starts one
    printed line, in the same order."""
    import shutil

    from tests.conftest import DEMO_DATA, tiny_retrained_graph
    from mini_retrain.cli import main

    text = (DOCS / "shenzhen.md").read_text(encoding="utf-8")
    section = text[text.index("## 9. "):text.index("## 10. ")]
    blocks = [code for language, code in split_markdown(section)[1] if language == "text"]
    assert len(blocks) == 1
    documented = [line for line in blocks[0].splitlines() if line.strip()]
    monkeypatch.chdir(tmp_path)
    tiny_retrained_graph(tiny_backbone, tmp_path, internal_test={"n": 50, "correct": 45, "accuracy": 0.9,
                         "ci": [0.786, 0.957]}, labels=("abnormal", "normal"), name="retrained_graph.onnx")
    for source in sorted((DEMO_DATA / "pneumonia-demo").glob("*/*.jpeg")):
        folder = Path("lungs_montgomery") / ("normal" if source.parent.name == "normal" else "abnormal")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / source.name)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert main(["evaluate", "--graph", "retrained_graph.onnx", "--image_dir", "lungs_montgomery",
                     "--device", "cpu"]) == 0
    printed = [_shape(line) for line in output.getvalue().splitlines()]
    position = 0
    for line in documented:
        prefix = _shape(line.split("...")[0])
        found = next((i for i in range(position, len(printed)) if printed[i].startswith(prefix)), None)
        assert found is not None, f"shenzhen.md shows {line!r}; evaluate printed {output.getvalue()}"
        position = found + (1 if prefix else 0)
