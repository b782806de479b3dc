"""Loads a tiny test task's JSONL splits from this directory, whatever the working directory."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data: str, **_metadata) -> datasets.DatasetDict:
    """lm-eval calls this with the task's metadata and dataset_kwargs; `data` names the files."""
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_json(str(HERE / f"{data}.{split}.jsonl"))
            for split in ("train", "test")
        }
    )
