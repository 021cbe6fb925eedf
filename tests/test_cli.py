"""The `llamaforge` command line on the tiny checkpoints: generate, chat, info, demo flags, errors."""

import json
import subprocess
import sys

import pytest

from llamaforge import Llama
from llamaforge.cli.main import main


def test_generate_with_metas_flags_prints_the_api_result(tiny_checkpoints, capsys):
    code = main(["generate", "--ckpt_dir", str(tiny_checkpoints.meta), "--tokenizer_path", str(tiny_checkpoints.tokenizer),
                 "--max_seq_len", "64", "--max_batch_size", "2", "--temperature", "0", "--top_p", "0.9",
                 "--max_gen_len", "6", "-p", "hello world", "-p", "the llama"])
    assert code == 0
    out = capsys.readouterr().out
    gen = Llama.build(tiny_checkpoints.meta, max_seq_len=64, max_batch_size=2, device="cpu")
    expected = gen.text_completion(["hello world", "the llama"], temperature=0, max_gen_len=6)
    for prompt, result in zip(["hello world", "the llama"], expected):
        assert prompt + result["generation"] in out


def test_generate_stream_and_logprobs(tiny_checkpoints, capsys):
    assert main(["generate", str(tiny_checkpoints.hf), "--temperature", "0", "-n", "5", "-p", "hello", "--stream"]) == 0
    assert capsys.readouterr().out.startswith("hello")
    assert main(["generate", str(tiny_checkpoints.hf), "--temperature", "0", "-n", "3", "-p", "hi", "--logprobs"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(lines) == 3 and all(float(line.rsplit("\t", 1)[1]) <= 0 for line in lines)


def test_chat_reads_stdin_and_keeps_history(tiny_checkpoints, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nthe model\n\n"))
    assert main(["chat", str(tiny_checkpoints.meta), "--temperature", "0", "-n", "4", "--system", "be brief"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # one answer line per user line


def test_info_describes_the_checkpoint(tiny_checkpoints, capsys):
    assert main(["info", str(tiny_checkpoints.gguf), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gguf"
    assert info["args"]["n_layers"] == 2 and info["args"]["n_kv_heads"] == 2
    assert info["tokenizer"]["kind"] == "gguf-llama"
    assert info["chat_format"] == "llama2"
    assert main(["info", str(tiny_checkpoints.meta_mp2)]) == 0
    assert "format:      meta" in capsys.readouterr().out


def test_errors_are_one_line_messages_in_the_flags_words(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "-p", "x"]) == 2  # found before the model loads
    err = capsys.readouterr().err
    assert err.startswith("error: MODEL ") and "does not exist" in err and "Traceback" not in err
    assert main(["generate", "-p", "x", "--temperature", "0", "--max_seq_len", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --max-seq-len must be") and "max_seq_len" not in err


def test_console_script_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "llamaforge", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("demo", "generate", "chat", "info", "convert"):
        assert command in out.stdout
