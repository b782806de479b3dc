"""Every trial of a study as one pandas table.

One function reads the study and flattens what the controller stored on each trial (parameters,
per-task scores, fitness, timing, worker, failure reason) into columns, so the CLI's
`evomerge trials`, the model card's plot and the dashboard all show the same numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from evomerge.ledger import TrialAttr
from evomerge.study import StudyRecord, existing_default_storage, load

PARAM_PREFIX = "param:"
SCORE_PREFIX = "score:"
HEAD_COLUMNS = ["number", "state", "generation", "index"]
TAIL_COLUMNS = ["fitness", "duration", "worker", "fail_reason", "datetime_start", "datetime_complete"]


class TrialsError(ValueError):
    """The table cannot be written as asked (unknown format, missing parquet engine)."""


def _duration(t: optuna.trial.FrozenTrial) -> float:
    """The worker's own seconds when recorded; else the storage's start-to-complete time."""
    if TrialAttr.SECONDS in t.user_attrs:
        return float(t.user_attrs[TrialAttr.SECONDS])
    if t.datetime_start and t.datetime_complete:
        return (t.datetime_complete - t.datetime_start).total_seconds()
    return math.nan


def _row(t: optuna.trial.FrozenTrial) -> dict:
    attrs = t.user_attrs
    row = {
        "number": t.number,
        "state": t.state.name,
        "generation": attrs.get(TrialAttr.GENERATION),
        "index": attrs.get(TrialAttr.INDEX),
        "fitness": t.value if t.state == TrialState.COMPLETE else math.nan,
        "duration": _duration(t),
        "worker": attrs.get(TrialAttr.WORKER),
        "fail_reason": attrs.get(TrialAttr.FAIL_REASON),
        "datetime_start": t.datetime_start,
        "datetime_complete": t.datetime_complete,
    }
    row.update({PARAM_PREFIX + k: float(v) for k, v in t.params.items()})
    for task, metrics in (attrs.get(TrialAttr.SCORES) or {}).items():
        for metric, value in metrics.items():
            row[f"{SCORE_PREFIX}{task}:{metric}"] = math.nan if value is None else float(value)
    return row


def _ordered(columns: list[str], prefix: str) -> list[str]:
    """Columns with `prefix`, in the order first seen (parameters keep the search space's order)."""
    return [c for c in columns if c.startswith(prefix)]


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, ordered by trial number; empty studies give the columns and no rows."""
    rows = [_row(t) for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    cols = list(seen) or HEAD_COLUMNS + TAIL_COLUMNS
    order = HEAD_COLUMNS + _ordered(cols, PARAM_PREFIX) + _ordered(cols, SCORE_PREFIX) + TAIL_COLUMNS
    df = pd.DataFrame(rows, columns=order)
    for col in ("generation", "index"):
        df[col] = df[col].astype("Int64")
    df["fitness"] = df["fitness"].astype(float)
    return df


def trials_table(study: str | StudyRecord, storage: str | None = None) -> pd.DataFrame:
    """The table of a study given by name (and storage URL, default ./runs/NAME/study.db) or record."""
    if isinstance(study, StudyRecord):
        return trials_frame(study.study)
    return trials_frame(load(study, storage or existing_default_storage(study)).study)


def candidates(df: pd.DataFrame) -> pd.DataFrame:
    """Only the search's candidates (trials with a generation), the rows the plots are about."""
    return df[df["generation"].notna()]


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """CSV or Parquet, chosen by the file's suffix."""
    p = Path(path)
    if p.suffix not in (".csv", ".parquet"):
        raise TrialsError(f"{p}: give a file ending in .csv or .parquet")
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".csv":
        df.to_csv(p, index=False)
        return p
    try:
        df.to_parquet(p, index=False)
    except ImportError as exc:
        raise TrialsError(f"writing Parquet needs pyarrow: pip install pyarrow ({exc})") from exc
    return p


def format_table(df: pd.DataFrame) -> str:
    """The whole table as text for a terminal: every column, floats to 4 decimals."""
    if df.empty:
        return "(no trials yet)"
    shown = df.drop(columns=["datetime_start", "datetime_complete"]).astype({"fail_reason": object})
    shown["fail_reason"] = shown["fail_reason"].where(shown["fail_reason"].notna(), "-")
    shown["worker"] = shown["worker"].where(shown["worker"].notna(), "-")
    with pd.option_context("display.max_columns", None, "display.width", 10_000,
                           "display.max_colwidth", 60, "display.max_rows", None):
        return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")
