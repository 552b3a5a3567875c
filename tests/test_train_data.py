"""Training data formats: JSONL, Parquet, save_to_disk folders and cached hub datasets give the
same examples; chat records learn the assistant turns only; bad records and truncation are
reported."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from helpers.models import save_chat_tokenizer

from remix_infer.train.data import IGNORE_INDEX, Example, read_examples, tokenize

CHAT = [
    {"role": "system", "content": "w0"},
    {"role": "user", "content": "w1 w2"},
    {"role": "assistant", "content": "w3"},
    {"role": "user", "content": "w4"},
    {"role": "assistant", "content": "w5 w6"},
]
# Every record has every column, null where it does not apply, as in a table.
RECORDS = [
    {"prompt": "w1 w2", "completion": "w3", "domain": 1, "messages": None},
    {"prompt": None, "completion": None, "domain": None, "messages": CHAT},
    {"prompt": "w4", "completion": "w5 w6", "domain": None, "messages": None},
]
EXAMPLES = [
    Example("w1 w2", "w3", 1),
    Example("", "", None, CHAT),
    Example("w4", "w5 w6"),
]


def write_formats(root) -> dict[str, str]:
    """RECORDS as each format, by name: the data source a --data flag would name."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    sources = {"jsonl": root / "d.jsonl", "parquet": root / "d.parquet"}
    sources["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    pq.write_table(pa.Table.from_pylist(RECORDS), sources["parquet"])
    dataset = datasets.Dataset.from_list(RECORDS)
    dataset.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(root / "saved_dict"))
    sources |= {"save_to_disk": root / "saved", "save_to_disk dict": root / "saved_dict"}
    return {name: str(path) for name, path in sources.items()}


def cache_hub_dataset(cache, name: str, parquet) -> None:
    """Leave `name` in the datasets cache as an online load_dataset of a Parquet hub repo
    does: {owner}___{name}/default/0.0.0/{hash}/ holding {name}-train.arrow and its info."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, short = name.split("/")
    builder = Parquet(
        data_files={"train": str(parquet)}, dataset_name=short, hash="0" * 16,
        cache_dir=str(cache / "build"),
    )  # fmt: skip
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, cache / f"{owner}___{short}" / "default/0.0.0" / ("0" * 16))


def test_every_format_gives_the_same_examples(tmp_path, monkeypatch):
    import datasets

    sources = write_formats(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    cache_hub_dataset(tmp_path / "cache", "acme/mixed", sources["parquet"])
    sources["hub cache"] = "acme/mixed"
    for name, source in sources.items():
        assert read_examples(source) == EXAMPLES, name


def test_a_hub_name_not_in_the_cache_is_refused_without_the_network(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty")
    with pytest.raises(ValueError, match="acme/absent: not a data file.*local cache"):
        read_examples("acme/absent")


def test_a_bad_record_is_refused_with_its_file_and_line_or_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl, parquet = tmp_path / "d.jsonl", tmp_path / "d.parquet"
    bad_chat = {"messages": [{"role": "assistant", "content": 3}]}
    jsonl.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(bad_chat) + "\n")
    pq.write_table(pa.Table.from_pylist([RECORDS[0], {**RECORDS[0], "completion": None}]), parquet)
    with pytest.raises(ValueError) as error:
        read_examples(jsonl)
    assert str(error.value) == f"{jsonl}:2: field 'messages[0].content' must be a string"
    with pytest.raises(ValueError) as error:
        read_examples(parquet)
    assert str(error.value) == f"{parquet}: row 1: field 'completion' must be a string"


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("chat_tok")
    save_chat_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


def test_chat_loss_covers_the_assistant_turns_only(chat_tokenizer):
    data = tokenize(chat_tokenizer, [Example("", "", None, CHAT)], max_length=64)
    tokens = chat_tokenizer.convert_ids_to_tokens(data.input_ids[0].tolist())
    learned = [
        tok if label != IGNORE_INDEX else "."
        for tok, label in zip(tokens, data.labels[0].tolist(), strict=True)
    ]
    assert " ".join(tokens) == (
        "<s> system : w0 </s> <s> user : w1 w2 </s> <s> assistant : w3 </s> "
        "<s> user : w4 </s> <s> assistant : w5 w6 </s>"
    )
    assert " ".join(learned) == (
        ". . . . . . . . . . . . . . w3 </s> . . . . . . . . w5 w6 </s>"
    )  # each assistant turn's content and end of turn, never its header


def test_truncation_is_counted_in_the_log(chat_tokenizer, caplog):
    examples = [Example("w1", "w2 w3 w4"), Example("w1 w2 w3 w4 w5", "w6"), Example("w1", "w2")]
    with caplog.at_level(logging.WARNING, logger="remix_infer.train.data"):
        data = tokenize(chat_tokenizer, examples, max_length=5)
    assert data.truncated == 2 and data.input_ids.shape[1] == 5
    assert (
        "--max-length 5: 2 of 3 examples truncated (1 of them kept no loss tokens)" in caplog.text
    )


def test_chat_records_need_a_chat_template(chat_tokenizer):
    chat_tokenizer = chat_tokenizer.__class__.from_pretrained(chat_tokenizer.name_or_path)
    chat_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="record 1 is a chat record, but the tokenizer has no"):
        tokenize(chat_tokenizer, EXAMPLES, max_length=64)
