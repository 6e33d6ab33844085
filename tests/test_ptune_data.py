"""P-Tuning data: THUDM's preprocessing checked against hand-written ids, and every bad-data error.

The ids below are those of the test tokenizer (`ptune_helpers.make_base_dir`, a SentencePiece model
trained on the rows); `test_pinned_token_ids` pins them, so the layouts that follow are written by hand.
"""
import json

import pytest

from glm_kernels import ChatGLMTokenizer
from glm_kernels.ptuning import main
from glm_kernels.ptuning.arguments import DataTrainingArguments
from glm_kernels.ptuning.data import GenerationCollator, TrainCollator, eval_features, train_features
from ptune_helpers import ADGEN_ROWS, make_base_dir, write_jsonl

GMASK, SOP, EOP, PAD = 86, 89, 90, 3
CONTENT0 = [349, 359, 355, 350, 358, 351, 364, 363, 350, 375, 351, 366, 365, 350, 377]  # 类型#裙*颜色#红色*风格#复古
SUMMARY0 = [349, 439, 430, 375, 358, 378, 377, 420, 486, 353]  # 这款红色裙子复古优雅。


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_dir(tmp_path_factory.mktemp("ptune-base"))


@pytest.fixture(scope="module")
def tok(base):
    return ChatGLMTokenizer.from_pretrained(str(base))


def data_args(**kw):
    return DataTrainingArguments(**{"train_file": "x.json", "prompt_column": "content",
                                    "response_column": "summary", **kw})


def columns(rows, *names):
    return {name: [r.get(name) for r in rows] for name in names}


def test_pinned_token_ids(tok):
    assert tok.encode(ADGEN_ROWS[0]["content"], add_special_tokens=False) == CONTENT0
    assert tok.encode(ADGEN_ROWS[0]["summary"], add_special_tokens=False) == SUMMARY0
    assert (tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (GMASK, SOP, EOP, PAD)


def test_training_row_layout_and_labels(tok):
    out = train_features(tok, data_args(max_source_length=64, max_target_length=64))(
        columns(ADGEN_ROWS[:1], "content", "summary"), [0])
    assert out["input_ids"] == [CONTENT0 + [GMASK, SOP] + SUMMARY0 + [EOP]]
    assert out["labels"] == [[-100] * 16 + [SOP] + SUMMARY0 + [EOP]]  # -100 over prompt and [gMASK]


def test_training_truncation_keeps_source_minus_1_and_target_minus_2(tok):
    out = train_features(tok, data_args(max_source_length=6, max_target_length=5))(
        columns(ADGEN_ROWS[:1], "content", "summary"), [0])
    assert out["input_ids"] == [[349, 359, 355, 350, 358, GMASK, SOP, 349, 439, 430, EOP]]
    assert out["labels"] == [[-100] * 6 + [SOP, 349, 439, 430, EOP]]
    assert out["prompt_tokens"] == [15] and out["response_tokens"] == [10]  # lengths before truncation


def test_source_prefix_and_empty_rows_skipped_as_the_original(tok):
    rows = [{"content": "", "summary": "x"}, ADGEN_ROWS[0], {"content": "y", "summary": None}]
    out = train_features(tok, data_args(max_source_length=64, max_target_length=64, source_prefix="类型"))(
        columns(rows, "content", "summary"), [10, 11, 12])
    assert out["row"] == [11]
    prefixed = tok.encode("类型" + ADGEN_ROWS[0]["content"], add_special_tokens=False)
    assert out["input_ids"][0][:len(prefixed)] == prefixed


def test_evaluation_rows(tok):
    out = eval_features(tok, data_args(max_source_length=6, max_target_length=5))(
        columns(ADGEN_ROWS[:1], "content", "summary"), [0])
    assert out["input_ids"] == [[349, 359, 355, 350, GMASK, SOP]]  # the tokenizer keeps max_source_length - 2
    assert out["labels"] == [[349, 439, 430, GMASK, SOP]]  # tokenizer(text_target=...), as THUDM


def test_chat_rows_flatten_history_as_chat(tok):
    rows = [{"prompt": "颜色", "response": "红色", "history": [["类型", "裙"]]},
            {"prompt": "颜色", "response": "红色", "history": []}]
    args = data_args(prompt_column="prompt", response_column="response", history_column="history",
                     max_source_length=64, max_target_length=64)
    out = train_features(tok, args)(columns(rows, "prompt", "response", "history"), [0, 1])
    with_history = tok.encode("[Round 0]\n问：类型\n答：裙\n[Round 1]\n问：颜色\n答：", add_special_tokens=False)
    assert out["input_ids"][0][:len(with_history) + 2] == with_history + [GMASK, SOP]
    bare = tok.encode("颜色", add_special_tokens=False)  # an empty history sends the bare query, as chat() does
    assert out["input_ids"][1][:len(bare) + 2] == bare + [GMASK, SOP]


def test_collators_pad_right_for_training_and_left_for_generation():
    batch = TrainCollator(PAD)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert TrainCollator(PAD, fixed_length=5)([{"input_ids": [5], "labels": [5]}])["input_ids"].shape[1] == 5
    gen = GenerationCollator(PAD)([{"input_ids": [5, 6, 7], "labels": [1]}, {"input_ids": [8], "labels": [2, 3]}])
    assert gen["input_ids"].tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert gen["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert gen["labels"].tolist() == [[1, -100], [2, 3]]


# ------------------------------------------------------------------ bad data: file, line, column; nothing written


def run_bad(base, tmp_path, capsys, train_file, *extra):
    out = tmp_path / "out"
    code = main(["--do_train", "--train_file", str(train_file), "--prompt_column", "content",
                 "--response_column", "summary", "--model_name_or_path", str(base), "--output_dir", str(out),
                 "--pre_seq_len", "4", "--max_steps", "1", "--max_source_length", "32",
                 "--max_target_length", "32", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists(), "nothing may be written to output_dir before the data is known good"
    return err


def test_missing_column(base, tmp_path, capsys):
    f = write_jsonl(tmp_path / "train.json", [{"content": "a", "text": "b"}])
    err = run_bad(base, tmp_path, capsys, f)
    assert "train.json" in err and "'summary'" in err and "--response_column" in err and "'text'" in err


def test_empty_file(base, tmp_path, capsys):
    f = tmp_path / "train.json"
    f.write_text("\n  \n")
    assert "train.json is empty" in run_bad(base, tmp_path, capsys, f)


def test_non_utf8(base, tmp_path, capsys):
    f = tmp_path / "train.json"
    f.write_bytes(b'{"content": "a", "summary": "b"}\n{"content": "a", "summary": "caf\xe9"}\n')
    err = run_bad(base, tmp_path, capsys, f)
    assert "train.json line 2, column 'summary'" in err and "not valid UTF-8" in err and "0xe9" in err


def test_invalid_json_line(base, tmp_path, capsys):
    f = tmp_path / "train.json"
    f.write_text('{"content": "a", "summary": "b"}\n\n{"content": "a", "summary": }\n')
    assert "train.json line 3: not valid JSON" in run_bad(base, tmp_path, capsys, f)


def test_value_that_is_not_text(base, tmp_path, capsys):
    f = write_jsonl(tmp_path / "train.json", [{"content": "a", "summary": "b"}, {"content": 5, "summary": "b"}])
    err = run_bad(base, tmp_path, capsys, f)
    assert "train.json line 2, column 'content'" in err and "expected text" in err and "int" in err


def test_bad_history(base, tmp_path, capsys):
    f = write_jsonl(tmp_path / "train.json", [{"content": "a", "summary": "b", "h": [["only one"]]}])
    err = run_bad(base, tmp_path, capsys, f, "--history_column", "h")
    assert "train.json line 1, column 'h'" in err and "[query, response] pairs" in err


def test_overlong_row_error_names_file_line_and_column(base, tmp_path, capsys):
    rows = [ADGEN_ROWS[1], {"content": "颜色", "summary": "红色" * 40}]
    f = write_jsonl(tmp_path / "train.json", rows)
    err = run_bad(base, tmp_path, capsys, f, "--max_target_length", "16", "--overlong_rows", "error")
    assert "train.json line 2, column 'summary'" in err and "over the limit of 14" in err


def test_csv_missing_column_and_json_array(base, tmp_path, capsys):
    f = tmp_path / "train.csv"
    f.write_text("content,other\na,b\n", encoding="utf-8")
    assert "train.csv: column 'summary'" in run_bad(base, tmp_path, capsys, f)
    g = tmp_path / "train.json"
    g.write_text(json.dumps([{"content": "a", "summary": "b"}, {"content": "a", "summary": 7}]))
    assert "train.json row 2, column 'summary'" in run_bad(base, tmp_path, capsys, g)


def test_missing_file_and_wrong_extension(base, tmp_path, capsys):
    assert "no such file" in run_bad(base, tmp_path, capsys, tmp_path / "nope.json")
    assert ".csv file" in run_bad(base, tmp_path, capsys, tmp_path / "train.txt")


def test_quantization_bit_other_than_4_or_8_is_refused_clearly(base, tmp_path, capsys):
    f = write_jsonl(tmp_path / "train.json", ADGEN_ROWS)
    err = run_bad(base, tmp_path, capsys, f, "--quantization_bit", "2")
    assert "--quantization_bit 2: weight-only quantization takes 4 or 8" in err
