"""scripts/benchmark.py's parts. What it measures: one module per kind of row (train_rows, eval_rows,
cache_rows, compile_rows, teacher_layout_rows, pipeline_rows), each a function from a Bench (setting.py) to
{figure: value} and the labels of its figures; the official DeiT loss the train row compares against
(official.py). How it measures: presets.py, timing.py, setting.py, run.py. How it prints: report.py (the
Markdown table, the JUnit counts)."""
