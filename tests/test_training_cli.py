"""The training commands: `llamaforge tokenizer train`, `llamaforge train` (TOML + flags, stop and
resume) and `llamaforge eval` on the model it exported."""

from __future__ import annotations

import json
import os

import pytest

from llamaforge.cli.main import main
from llamaforge.cli.train import parse_value
from llamaforge.tokenizer import Tokenizer
from tests.test_training_support import TINY_ARGS, workspace


def test_parse_value_reads_toml_values_or_plain_strings():
    assert parse_value("3") == 3 and parse_value("1e-3") == 0.001 and parse_value("true") is True
    assert parse_value('["wq", "wv"]') == ["wq", "wv"] and parse_value("runs/x") == "runs/x"


def test_tokenizer_train_command(tmp_path, capsys):
    out = tmp_path / "tok.model"
    assert main(["tokenizer", "train", str(workspace() / "corpus.txt"), "-o", str(out), "--vocab-size", "300"]) == 0
    assert "300 tokens" in capsys.readouterr().out
    tok = Tokenizer.from_file(out)
    assert tok.n_words == 300 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.decode(tok.encode("Red fish 1234 ünïcode")) == "Red fish 1234 ünïcode"  # byte fallback: lossless
    assert len([t for t in tok.encode("1234")]) >= 4  # digits are split one by one, as Llama's
    assert main(["tokenizer", "encode", str(out), "the cat"]) == 0
    assert "▁" in capsys.readouterr().out  # sentencepiece pieces, with the word-start mark


def test_train_command_stops_resumes_and_eval_reads_the_result(tmp_path, capsys):
    ws = workspace()
    cfg = tmp_path / "run.toml"
    model_args = "\n".join(f"{k} = {v}" for k, v in TINY_ARGS.items())
    cfg.write_text(f'data = ["{ws / "corpus.txt"}"]\ntokenizer = "{ws / "tok.model"}"\nseq_len = 32\n'
                   f"batch_size = 4\nmax_steps = 50\nprogress = false\neval_every = 2\n[model_args]\n{model_args}\n")
    out = tmp_path / "out"
    base = ["train", str(cfg), "--out-dir", str(out), "--max-steps", "4", "--lr", "0.01",
            "--set", "eval_batches=1", "--set", "model_args.n_layers=1"]
    assert main(base + ["--stop-after", "2"]) == 0
    printed = capsys.readouterr().out
    assert "trained steps 0 -> 2" in printed and "run the same command again to resume" in printed
    assert main(base) == 0
    printed = capsys.readouterr().out
    assert "trained steps 2 -> 4" in printed and f"model: {out / 'model'}" in printed
    assert main(base) == 0  # a finished run says so instead of training 0 steps
    printed = capsys.readouterr().out
    assert "already finished its 4 steps" in printed and "trained steps" not in printed
    mask = os.umask(0)
    os.umask(mask)
    for written in (out / "checkpoint.pt", out / "model" / "params.json", *(out / "model").glob("*.pth")):
        assert written.stat().st_mode & 0o777 == 0o666 & ~mask, written  # the umask's mode, not mkstemp's 0600
    params = json.loads((out / "model" / "params.json").read_text())
    assert params["n_layers"] == 1  # --set reached the [model_args] table

    text = tmp_path / "eval.txt"
    text.write_text((ws / "corpus.txt").read_text()[:3000])
    assert main(["eval", str(out / "model"), "--data", str(text), "--window", "32", "--stride", "16", "--json",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["window"] == 32 and result["stride"] == 16 and result["tokens"] > 500
    assert 1.0 < result["perplexity"] < 320  # better than uniform over the 320-token vocabulary


def test_train_command_reports_bad_settings(tmp_path, capsys):
    assert main(["train", "--data", str(workspace() / "corpus.txt"), "--out-dir", str(tmp_path)]) == 1
    assert "set `model`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--set", "no-equals-sign"])
