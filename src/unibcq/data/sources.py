"""Text sources for calibration and evaluation.

A source is a known dataset name (`wikitext2`, `wikitext2-gptq`, `ptb`) or a local `.txt` / `.jsonl` file.
Known datasets are read from a local data directory (`--data-dir`, else $UNIBCQ_DATA_DIR)
laid out as in the shared datasets folder; when neither has them, the Hugging Face
`datasets` loader is tried (needs the network and `pip install datasets`).

Calibration never uses the evaluation text: for `wikitext2` it draws from the WikiText-2
validation split (its word-level version with <unk>, the one the local folder holds; the Hub's
`wikitext-2-v1`), for `ptb` from PTB validation. A local file is used as given for both.

A known dataset's text is the same string whether it comes from the folder or the Hub:
its non-empty lines, stripped of line endings, joined by the dataset's separator. For
`ptb` that is GPTQ's `ptb-new` text (sentences joined by " "). For `wikitext2` it is the
lines joined by a blank line, which is not quite GPTQ's string: GPTQ joins the Hub rows
with "\\n\\n", and those rows keep their newline and include the empty rows around
headings. `wikitext2-gptq` is GPTQ's string exactly; the local raw file lacks the empty
rows, so they are put back from the row layout of the tokenized test file beside it
(`hub_rows`). On SmolLM2's tokenizer that is 304,986 tokens against wikitext2's 301,948
(1% more, nearly all of it the rows' own newlines); every figure in docs/BENCHMARKS.md was
measured on `wikitext2`, which stays as it is so that they remain comparable. The
evaluation stream is tokenised with the tokenizer's defaults (one BOS at its start where
the tokenizer adds one, as GPTQ does); calibration text without.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Sequence

import torch

from unibcq.errors import UnibcqError, not_utf8, one_line

EVAL = "eval"
CALIB = "calib"


@dataclass(frozen=True)
class KnownDataset:
    """Relative paths under the data directory, the Hub fallback for each split, and the
    separator that joins the text's lines."""

    files: dict[str, str]
    hub: tuple[str, dict[str, tuple[str | None, str]], str]  # (path, (config, split) per role, text column)
    separator: str = "\n\n"
    strip_lines: bool = False  # PTB's lines carry a space on each side; WikiText's leading space is text
    # role -> a file whose line layout (blank or not) is the Hub's row layout: the text is then the
    # Hub rows, each non-empty one keeping its newline, joined by `separator` (GPTQ's exact string)
    rows_layout: dict[str, str] = field(default_factory=dict)

    def joined(self, text: str) -> str:
        """The dataset's text from its raw lines, the same for the local file and the Hub rows."""
        return _join_lines(text, self.separator, self.strip_lines)

    def joined_rows(self, rows: Sequence[str]) -> str:
        """The Hub rows as GPTQ joins them: as they are (a row keeps its newline), by `separator`."""
        return self.separator.join(rows)


def hub_rows(text: str, layout: str, path: Path) -> list[str]:
    """The Hub's rows of WikiText-2-raw from the local raw file, which lacks its empty rows, and
    the tokenized file beside it, which has the same lines as the Hub's rows, empty ones included
    (4,358 rows for the test split, 1,467 empty): each blank layout line is an empty row, each
    other one the raw file's next non-empty line with its newline."""
    lines = [line for line in _lines(text) if line.strip()]
    layout_lines = _lines(layout)
    if layout_lines and not layout_lines[-1]:
        layout_lines.pop()  # the file's final newline ends the last row; it starts none
    if sum(1 for line in layout_lines if line.strip()) != len(lines):
        raise UnibcqError(f"{path}'s lines do not match its raw text line for line (another version?); "
                          "use --ppl wikitext2")
    raw = iter(lines)
    return [next(raw) + "\n" if line.strip() else "" for line in layout_lines]


KNOWN: dict[str, KnownDataset] = {
    "wikitext2": KnownDataset(
        files={EVAL: "wikitext-2-raw/wiki.test.raw", CALIB: "wikitext-2/wiki.valid.tokens"},
        # the local calibration file is the word-level (tokens) validation split, so is the Hub's
        hub=("wikitext", {EVAL: ("wikitext-2-raw-v1", "test"), CALIB: ("wikitext-2-v1", "validation")}, "text"),
    ),
    # GPTQ's string digit for digit: the Hub rows joined by "\n\n", empty rows and each row's
    # newline included (1% more tokens than wikitext2's; see the module docstring)
    "wikitext2-gptq": KnownDataset(
        files={EVAL: "wikitext-2-raw/wiki.test.raw", CALIB: "wikitext-2/wiki.valid.tokens"},
        hub=("wikitext", {EVAL: ("wikitext-2-raw-v1", "test"), CALIB: ("wikitext-2-v1", "validation")}, "text"),
        rows_layout={EVAL: "wikitext-2/wiki.test.tokens"},
    ),
    "ptb": KnownDataset(
        files={EVAL: "ptb/ptb.test.txt", CALIB: "ptb/ptb.valid.txt"},
        hub=("ptb_text_only", {EVAL: ("penn_treebank", "test"), CALIB: ("penn_treebank", "validation")}, "sentence"),
        separator=" ",
        strip_lines=True,
    ),
}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    chosen = data_dir or os.environ.get("UNIBCQ_DATA_DIR")
    return Path(chosen).expanduser() if chosen else None


def _lines(text: str) -> list[str]:
    """The lines of `text`, whatever its line endings."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _join_lines(text: str, separator: str = "\n\n", strip: bool = False) -> str:
    """Join the non-empty lines (stripped, if `strip`) with `separator`."""
    return separator.join(line.strip() if strip else line for line in _lines(text) if line.strip())


def _read_local_file(path: Path) -> str:
    """A user's text file: JSON lines with a 'text' field (.jsonl), else the text as it is."""
    if path.suffix.lower() == ".jsonl":
        rows = []
        for lineno, row in read_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UnibcqError(f"{path}:{lineno} needs a string field 'text'")
            rows.append(row["text"])
        return "\n\n".join(rows)
    return read_utf8(path)


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, object) for every non-empty line, lazily, so --limit reads little."""
    with path.open(encoding="utf-8") as handle:
        try:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UnibcqError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
                yield lineno, row
        except UnicodeDecodeError as exc:
            raise not_utf8(path, exc) from exc


def read_utf8(path: Path) -> str:
    """A text file's contents, or one error naming it when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from exc


HUB_HINT = "pass --data-dir / set UNIBCQ_DATA_DIR to a folder holding it (e.g. the shared datasets folder)"


def _hub_datasets(name: str) -> ModuleType:
    """The `datasets` module, once it is known that `name` can be fetched: installed, and the
    Hub's host resolves (offline, huggingface_hub would retry for ~23 s before failing)."""
    try:
        import datasets
    except ImportError as exc:
        raise UnibcqError(
            f"{name} is not in a local data directory; pass --data-dir / set UNIBCQ_DATA_DIR "
            "(e.g. to the shared datasets folder), or `pip install datasets` when online"
        ) from exc
    from unibcq.models.loading import hub_unreachable

    host = hub_unreachable()
    if host is not None:
        raise UnibcqError(f"{name} is not in a local data directory, and {host} cannot be resolved (offline?); "
                          f"{HUB_HINT}, or set HF_HUB_OFFLINE=1 to read a copy in the datasets cache")
    return datasets


def _from_hub(name: str, role: str) -> str:
    datasets = _hub_datasets(name)
    hub_path, splits, column = KNOWN[name].hub
    hub_config, split = splits[role]
    try:
        rows = datasets.load_dataset(hub_path, hub_config, split=split)[column]
    except Exception as exc:  # the datasets library raises many kinds of network errors
        raise UnibcqError(f"could not fetch {name} from the Hugging Face Hub ({one_line(exc)}); {HUB_HINT}") from exc
    known = KNOWN[name]
    return known.joined_rows(rows) if role in known.rows_layout else known.joined("\n".join(rows))


def _local_file(source: str, role: str, data_dir: str | os.PathLike | None) -> Path | None:
    """The file `source` is read from for `role`, or None for a known dataset that comes from
    the Hub (no data directory); every source that cannot be read is refused here."""
    if source in KNOWN:
        root = resolve_data_dir(data_dir)
        if root is None:
            return None
        known = KNOWN[source]
        needed = [known.files[role], *([known.rows_layout[role]] if role in known.rows_layout else [])]
        for relative in needed:
            if not (root / relative).is_file():
                raise UnibcqError(f"{source} {role} file {root / relative} not found; point --data-dir / "
                                  f"UNIBCQ_DATA_DIR at a folder containing {relative}")
        return root / needed[0]
    path = Path(source).expanduser()
    if path.suffix.lower() == ".json":
        raise UnibcqError(f"{path}: give JSON lines (.jsonl, one object with a 'text' field per line) or a plain "
                          "text file")
    if path.suffix.lower() not in (".txt", ".jsonl", ".raw", ".tokens") and not path.exists():
        raise UnibcqError(f"unknown data source {source!r}; use {', '.join(KNOWN)} or a text file "
                          "(.jsonl: one JSON row with a 'text' field per line)")
    if path.is_dir():
        raise UnibcqError(f"{path} is a directory; give a text file, or a known dataset with --data-dir")
    if not path.is_file():
        raise UnibcqError(f"data file {path} not found")
    return path


def check_source(source: str, role: str = EVAL, data_dir: str | os.PathLike | None = None) -> None:
    """Refuse now, before a model loads (or a compare measures its unquantized row for hours),
    a source `load_text` would refuse later: an unknown name, a missing file, or a dataset
    with no data directory and no way to fetch it."""
    if _local_file(source, role, data_dir) is None:
        _hub_datasets(source)


def load_text(source: str, role: str = EVAL, data_dir: str | os.PathLike | None = None) -> str:
    """The text of `source` for `role` (EVAL or CALIB)."""
    path = _local_file(source, role, data_dir)
    if path is None:
        return _from_hub(source, role)
    if source not in KNOWN:
        return _read_local_file(path)
    known = KNOWN[source]
    if role in known.rows_layout:
        layout = resolve_data_dir(data_dir) / known.rows_layout[role]
        return known.joined_rows(hub_rows(read_utf8(path), read_utf8(layout), layout))
    return known.joined(read_utf8(path))


def _tokenize(tokenizer, text: str, special_tokens: bool = False) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=special_tokens, verbose=False)["input_ids"][0]
    return ids.to(torch.long)


def eval_token_ids(tokenizer, source: str, data_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """The evaluation text tokenised once (1-D), with the tokenizer's special tokens as GPTQ's
    evaluation has them (a BOS at the start of the stream for Llama-2's tokenizer)."""
    return _tokenize(tokenizer, load_text(source, EVAL, data_dir), special_tokens=True)


def calibration_windows(
    tokenizer,
    source: str,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """`n_samples` random windows of `seq_len` tokens (seeded) from the calibration split."""
    if n_samples < 1 or seq_len < 2:
        raise UnibcqError(f"need at least 1 calibration sample of >= 2 tokens, got {n_samples} x {seq_len}")
    ids = _tokenize(tokenizer, load_text(source, CALIB, data_dir))
    if len(ids) <= seq_len:
        raise UnibcqError(f"calibration text {source} has {len(ids)} tokens; windows of --seq-len {seq_len} "
                          "need more")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
