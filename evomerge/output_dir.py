"""The export's output directory: refused when it holds something, written staged, renamed into place.

Everything is written into a staging directory beside --out (`.NAME.partial-*`) that is renamed
to --out at the end (with --force, its files replace the old export's); on any failure the
staging directory, and any parent directory the export created, is removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from evomerge.kinds import Built

_WEIGHT_GLOBS = ("model*.safetensors", "model.safetensors.index.json")
# What an export writes: with --force these files of an older export are replaced or removed, so
# a DFS export over a PS one leaves no stale mergekit.yaml (other files in the directory stay).
_EXPORT_GLOBS = _WEIGHT_GLOBS + ("recipe.yaml", "mergekit.yaml", "README.md", "summary.json", "fitness.png",
                                 "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                                 "chat_template.*", "vocab.*", "merges.txt", "added_tokens.json")

class ExportError(ValueError):
    """The export cannot be made as asked; the message says what to change."""


def check_out_dir(out: str | Path, force: bool = False) -> Path:
    """--out as a path, refused when it is a file or a non-empty directory (unless `force`)."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise ExportError(f"output {p} is a file; give a directory (it is created if missing)")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise ExportError(f"output directory {p} is not empty; give a new directory or use --force "
                          "to overwrite the export in it")
    return p


class StagedOutput:
    """A staging directory beside --out (inside it when the parent is not writable), moved to --out
    at `commit`; removed on failure.

    Used as a context manager: an exception inside removes the staging directory and any parent
    of --out that it created, so a failed export leaves the file system as it found it (an
    existing --out, empty or holding an older export, is not touched until `commit`).
    """

    def __init__(self, out: str | Path, force: bool = False) -> None:
        self.out = check_out_dir(out, force)
        self.force = force
        self.created: list[Path] = []
        self.dir: Path | None = None

    def __enter__(self) -> Path:
        target = self.out.absolute()
        parent = target.parent
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.created = missing  # deepest first
            try:
                self.dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
            except OSError:  # a parent we may not write to: stage inside the (existing) --out instead
                if not target.is_dir():
                    raise
                self.dir = Path(tempfile.mkdtemp(prefix=".evomerge.partial-", dir=target))
        except OSError as exc:
            self.__exit__(type(exc), exc, None)
            raise ExportError(f"cannot write the output {self.out}: {exc}") from exc
        umask = os.umask(0)
        os.umask(umask)
        self.dir.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; --out gets a normal directory's mode
        return self.dir

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        if self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        for p in self.created:
            try:
                p.rmdir()
            except OSError:
                break

    def commit(self) -> Path:
        """Move the staged files to --out: one rename when --out does not exist yet."""
        staged = self.dir
        if not self.out.exists():
            os.rename(staged, self.out)
        else:  # an empty --out, or (--force) an older export: replace its files, drop those this one lacks
            if not self.force and any(f.resolve() != staged.resolve() for f in self.out.iterdir()):
                raise ExportError(f"output directory {self.out} was written to while this export ran; "
                                  "give a new directory or use --force")
            new = {f.name for f in staged.iterdir()}
            for pattern in _EXPORT_GLOBS:
                for f in self.out.glob(pattern):
                    if f.is_file() and f.name not in new:
                        f.unlink()
            for f in staged.iterdir():
                os.replace(f, self.out / f.name)
            staged.rmdir()
        self.dir = None
        return self.out


def write_checkpoint(built: Built, out: Path, max_shard_size: str | int, trust_remote_code: bool = False) -> None:
    """safetensors (sharded above max_shard_size), config, tokenizer and generation config."""
    from transformers import AutoTokenizer

    built.model.save_pretrained(out, max_shard_size=max_shard_size)
    tok = AutoTokenizer.from_pretrained(str(built.config_dir), trust_remote_code=trust_remote_code)
    tok.save_pretrained(out)
    gen = built.config_dir / "generation_config.json"
    if gen.exists():
        shutil.copyfile(gen, out / "generation_config.json")
