"""A known dataset is the same text from the local folder and from the Hub, joined as GPTQ
joins it where the local files allow; the evaluation stream keeps the tokenizer's BOS."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from unibcq.data import calibration_windows, eval_token_ids, load_text
from unibcq.data.sources import CALIB, EVAL
from unibcq.errors import UnibcqError

WIKI_FILE = " = Title = \r\n Para one . \r\n\r\n = = Part = = \r\n Para two . \r\n"
WIKI_HUB_ROWS = ["", " = Title = \n", "", " Para one . \n", "", " = = Part = = \n", "", " Para two . \n"]
WIKI_TEST_TOKENS_FILE = " \n = Title = \n \n Para one . \n \n = = Part = = \n \n Para two . \n"  # the Hub's row layout
WIKI_TOKENS_FILE = " = Valid = \n\n The <unk> was here . \n"
WIKI_TOKENS_HUB_ROWS = ["", " = Valid = \n", "", " The <unk> was here . \n"]
PTB_FILE = " no it was n't black monday \n but while the new york stock exchange \n"
PTB_HUB_ROWS = ["no it was n't black monday", "but while the new york stock exchange"]


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_bytes(WIKI_FILE.encode())
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.valid.tokens").write_text(WIKI_TOKENS_FILE)
    (tmp_path / "wikitext-2" / "wiki.test.tokens").write_text(WIKI_TEST_TOKENS_FILE)
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(PTB_FILE)
    return tmp_path


@pytest.fixture
def fake_hub(monkeypatch):
    """A `datasets` module that serves Hub-shaped rows (WikiText's keep their newline and
    include empty rows; PTB's sentences come stripped)."""
    rows = {("wikitext", "wikitext-2-raw-v1", "test"): ("text", WIKI_HUB_ROWS),
            ("wikitext", "wikitext-2-v1", "validation"): ("text", WIKI_TOKENS_HUB_ROWS),
            ("ptb_text_only", "penn_treebank", "test"): ("sentence", PTB_HUB_ROWS)}

    def load_dataset(path, config, split):
        column, values = rows[path, config, split]
        return {column: values}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("UNIBCQ_DATA_DIR", raising=False)
    monkeypatch.setattr("unibcq.models.loading.hub_unreachable", lambda: None)  # online, whatever this machine is


def test_wikitext2_lines_are_joined_by_blank_lines_keeping_their_leading_space(data_dir):
    assert load_text("wikitext2", EVAL, data_dir) == " = Title = \n\n Para one . \n\n = = Part = = \n\n Para two . "


def test_ptb_is_gptqs_ptb_new_text(data_dir):
    assert load_text("ptb", EVAL, data_dir) == "no it was n't black monday but while the new york stock exchange"


def test_wikitext2_gptq_is_gptqs_string_the_hub_rows_joined_as_they_are(data_dir):
    """The raw file lacks the Hub's empty rows and drops its rows' newlines; the tokens file
    beside it has the rows' layout, so GPTQ's "\\n\\n".join(rows) is rebuilt exactly."""
    assert load_text("wikitext2-gptq", EVAL, data_dir) == "\n\n".join(WIKI_HUB_ROWS)
    (data_dir / "wikitext-2" / "wiki.test.tokens").write_text(WIKI_TEST_TOKENS_FILE + " Extra . \n")
    with pytest.raises(UnibcqError, match="do not match its raw text line for line"):
        load_text("wikitext2-gptq", EVAL, data_dir)
    (data_dir / "wikitext-2" / "wiki.test.tokens").unlink()
    with pytest.raises(UnibcqError, match="wiki.test.tokens not found"):
        load_text("wikitext2-gptq", EVAL, data_dir)


@pytest.mark.parametrize(("name", "role"), [("wikitext2", EVAL), ("wikitext2", CALIB), ("ptb", EVAL),
                                            ("wikitext2-gptq", EVAL), ("wikitext2-gptq", CALIB)])
def test_the_hub_and_the_local_folder_give_the_same_text(name, role, data_dir, fake_hub):
    assert load_text(name, role) == load_text(name, role, data_dir)


def test_offline_a_hub_dataset_fails_at_once_naming_the_local_folder(fake_hub, monkeypatch):
    """The datasets library retries an unresolvable host for ~23 s; the folder is the way out."""
    def must_not_be_called(*args, **kwargs):
        raise AssertionError("reached the Hub (and its retries)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=must_not_be_called))
    monkeypatch.setattr("unibcq.models.loading.hub_unreachable", lambda: "huggingface.co")
    with pytest.raises(UnibcqError, match="huggingface.co cannot be resolved.*--data-dir / set UNIBCQ_DATA_DIR"):
        load_text("wikitext2", CALIB)


def test_a_failed_hub_fetch_names_the_local_folder(fake_hub, monkeypatch):
    def refused(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=refused))
    with pytest.raises(UnibcqError, match="could not fetch wikitext2 .*Couldn't reach.*--data-dir / set UNIBCQ_DATA_DIR"):
        load_text("wikitext2", EVAL)


def test_a_missing_file_names_what_to_point_at(tmp_path):
    with pytest.raises(UnibcqError, match="wiki.valid.tokens"):
        load_text("wikitext2", CALIB, tmp_path)


class _BosTokenizer:
    """Words to ids, with id 1 as BOS when special tokens are asked for."""

    def __call__(self, text, return_tensors, add_special_tokens, verbose):
        ids = [1] * add_special_tokens + [2 + len(w) for w in text.split()]
        return {"input_ids": torch.tensor([ids])}


def test_the_evaluation_stream_starts_with_bos_and_calibration_windows_do_not(data_dir):
    ids = eval_token_ids(_BosTokenizer(), "ptb", data_dir)
    assert ids[0].item() == 1 and (ids[1:] != 1).all()
    (data_dir / "ptb" / "ptb.valid.txt").write_text(PTB_FILE * 4)
    windows = calibration_windows(_BosTokenizer(), "ptb", n_samples=8, seq_len=4, data_dir=data_dir)
    assert windows.shape == (8, 4) and (windows != 1).all()


@pytest.mark.parametrize("name", ["calib.txt", "calib.jsonl"])
def test_a_file_that_is_not_utf8_is_named_in_one_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UnibcqError, match=f"{name} is not UTF-8 text"):
        load_text(str(path))


def test_an_upper_case_jsonl_suffix_is_read_as_json_lines(tmp_path):
    upper = tmp_path / "rows.JSONL"
    upper.write_text('{"text": "a b c"}\n{"text": "d e"}\n')
    assert load_text(str(upper)) == "a b c\n\nd e"
