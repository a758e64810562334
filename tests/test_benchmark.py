"""benchmarks/benchmark.py stays runnable: it imports, has one measuring and one table function per row, and a
small training-only run (--rows e) goes through end to end. The full benchmark is run by hand (benchmarks/README.md)."""

import contextlib
import importlib.util
import io
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "benchmarks" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_table_function_per_row_and_the_batch_size_by_name():
    benchmark = load_benchmark()
    from mini_retrain.pipeline import bottlenecks

    assert set(benchmark.ROW_FUNCTIONS) == set(benchmark.ROWS)
    assert len({function for function, _ in benchmark.ROW_FUNCTIONS.values()}) == len(benchmark.ROWS)
    assert benchmark.PIPELINE_BATCH == bottlenecks.BATCH_SIZE
    assert "inspect.signature" not in (ROOT / "benchmarks" / "benchmark.py").read_text()


def test_a_training_only_run_prints_its_rows(tmp_path):
    benchmark = load_benchmark()
    output = tmp_path / "results.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert benchmark.main(["--rows", "e", "--no-torch", "--steps", "20", "--train-rows", "300", "--repeats", "1",
                               "--output", str(output)]) == 0
    rows = json.loads(output.read_text())["rows"]
    assert {row["row"] for row in rows} == {"e"} and len(rows) == 4
    assert "| e | NumPy training, 20 steps x batch 100, 300 rows: " in printed.getvalue()
