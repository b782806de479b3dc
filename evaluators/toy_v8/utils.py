"""Loader for the toy tasks: reads the JSONL named in a task's `dataset_kwargs` (relative to this
directory, so tasks load from any working directory) as the `test` split lm-eval asks for."""

import json
from pathlib import Path

import datasets


def load(data_file: str, split: str = "test", **_) -> datasets.DatasetDict:
    path = Path(__file__).resolve().parent / data_file
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
