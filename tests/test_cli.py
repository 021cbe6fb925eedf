"""The `llamaforge` command line on the tiny checkpoints: generate, chat, info, demo flags, errors."""

import json
import subprocess
import sys
import time

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
    assert main(["generate", "-p", "x", "--max-seq-len", "32", "--max-batch-size", "1", "-p", "y"]) == 1
    err = capsys.readouterr().err  # found by the library, said in the flags' words
    assert err.splitlines()[-1].startswith("error: 2 prompts given but --max-batch-size is 1")
    assert "max_batch" not in err


@pytest.mark.parametrize("flags, message", [
    (["-n", "-5"], "argument --max-gen-len/--max_gen_len/-n: must be an integer >= 0, got -5"),
    (["--max-seq-len", "0"], "argument --max-seq-len/--max_seq_len: must be an integer >= 1, got 0"),
    (["--max-batch-size", "0"], "must be an integer >= 1, got 0"),
    (["--top-p", "2"], "argument --top-p/--top_p: must be a number in [0, 1], got 2"),
    (["--top-p", "nan"], "must be a number in [0, 1], got nan"),
    (["--temperature", "-1"], "argument --temperature: must be a number >= 0, got -1"),
    (["--temperature", "inf"], "must be a number >= 0, got inf"),
    (["--top-k", "0"], "argument --top-k/--top_k: must be an integer >= 1, got 0"),
    (["--top-k", "2.5"], "argument --top-k/--top_k: takes an integer >= 1, got '2.5'"),
])
def test_out_of_range_flags_are_usage_errors_before_the_model_loads(flags, message, capsys):
    """Exit 2 at parse time, as for any bad flag (they were found after loading the model, exit 1)."""
    for command in ("generate", "chat", "demo"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "/nonexistent/model.gguf", "-p", "x", *flags] if command == "generate"
                 else [command, "/nonexistent/model.gguf", *flags])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_console_script_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "llamaforge", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("demo", "generate", "chat", "info", "convert"):
        assert command in out.stdout


# -- conventions: flags, help, suggestions, errors ---------------------------------------------------------

def walk_parsers(parser, name="llamaforge"):
    import argparse

    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from walk_parsers(sub, f"{name} {sub_name}")


def test_every_flag_has_help_and_a_dashed_main_spelling():
    from llamaforge.cli.main import build_parser

    names = []
    for name, parser in walk_parsers(build_parser()):
        names.append(name)
        for action in parser._actions:
            if action.dest == "help" or action.__class__.__name__ == "_SubParsersAction":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
            long = [s for s in action.option_strings if s.startswith("--")]
            assert not long or "_" not in long[0], f"{name} {long}: the dashed spelling comes first"
            assert all(s.replace("_", "-") in long for s in long), f"{name} {long}: an underscore flag needs a dash twin"
    assert {"llamaforge generate", "llamaforge chat", "llamaforge serve", "llamaforge tokenizer train"} <= set(names)


def test_help_shows_defaults_and_metas_spellings_still_work(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "--max-seq-len MAX_SEQ_LEN, --max_seq_len MAX_SEQ_LEN" in text
    assert "0 is greedy (default: 0.6)" in text and "(default: 64)" in text


def test_version_and_did_you_mean(capsys):
    from llamaforge import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"llamaforge {__version__}"
    with pytest.raises(SystemExit) as exit_:
        main(["genrate", "-p", "x"])
    assert exit_.value.code == 2 and "did you mean generate?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--max-seqlen", "5", "-p", "x"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --max-seqlen" in err and "did you mean --max-seq-len" in err
    assert err.startswith("usage: llamaforge generate")  # the subcommand's usage, not the top level's


def test_library_messages_are_rendered_with_flag_names():
    from llamaforge.cli.common import cli_message
    from llamaforge.errors import CheckpointError, ConfigError

    assert cli_message(CheckpointError("out already exists; pass overwrite=True to replace it")) == \
        "out already exists; pass --overwrite to replace it"
    assert cli_message(ConfigError("no CUDA here; use device='auto' or device='cpu'")) == \
        "no CUDA here; use --device auto or --device cpu"
    assert cli_message(ConfigError("build with a larger max_seq_len")) == "build with a larger --max-seq-len"
    assert cli_message(ConfigError("overwrite the file")) == "overwrite the file"  # words, not arguments, stay


FAST = """
import socket, sys
from llamaforge.cli.main import main
code = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules, "code:", code)
"""


def test_missing_paths_and_busy_ports_fail_before_torch_is_imported(tmp_path):
    import socket

    def run(*argv):
        out = subprocess.run([sys.executable, "-c", FAST, *argv], capture_output=True, text=True, timeout=60)
        return out.stdout.strip(), out.stderr.strip()

    out, err = run("generate", str(tmp_path / "nope.gguf"), "-p", "x")
    assert out == "torch imported: False code: 2" and f"MODEL {tmp_path / 'nope.gguf'} does not exist" in err
    out, err = run("info", str(tmp_path / "missing" / "model"))
    assert out == "torch imported: False code: 2"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out, err = run("serve", "--port", str(port))
    assert out == "torch imported: False code: 2"
    assert f"port {port} on 127.0.0.1 is already in use; choose another with --port" in err


def test_one_default_temperature_everywhere():
    import re
    from pathlib import Path

    from llamaforge.cli.common import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
    from llamaforge.generation.sampler import SamplingParams
    from llamaforge.server.prepare import DEFAULT_TEMPERATURE as SERVER_TEMPERATURE

    assert (DEFAULT_TEMPERATURE, DEFAULT_TOP_P) == (SamplingParams().temperature, SamplingParams().top_p) == (0.6, 0.9)
    assert SERVER_TEMPERATURE == DEFAULT_TEMPERATURE
    page = (Path(__file__).parents[1] / "llamaforge" / "server" / "static" / "chat.html").read_text()
    assert re.search(r'id="temperature"[^>]*value="0.6"', page)


def test_generate_for_scripts_json_and_completion_only(tiny_checkpoints, capsys):
    flags = [str(tiny_checkpoints.meta), "--temperature", "0", "-n", "5", "-p", "hello world", "-p", "the llama"]
    assert main(["generate", *flags, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    gen = Llama.build(tiny_checkpoints.meta, max_seq_len=64, max_batch_size=2, device="cpu")
    expected = gen.text_completion(["hello world", "the llama"], temperature=0, max_gen_len=5)
    assert [r["generation"] for r in rows] == [e["generation"] for e in expected]
    assert [r["prompt"] for r in rows] == ["hello world", "the llama"]
    assert main(["generate", *flags, "--completion-only"]) == 0
    assert capsys.readouterr().out == "".join(e["generation"] + "\n" for e in expected)


def test_serve_sizes_the_kv_block_pool_from_a_budget():
    from llamaforge.cli.common import UsageError
    from llamaforge.cli.serve import parse_size, size_pool

    assert parse_size("2GiB") == 2 * 2**30 and parse_size("512MB") == 512 * 10**6 and parse_size("1.5g") == 1_500_000_000
    with pytest.raises(UsageError, match="--kv-memory takes a size"):
        parse_size("lots")
    per = 46080  # SmolLM2-135M in float32: 2 * 30 layers * 3 kv heads * 64 * 4 bytes; a block of 64: 2.9 MB
    # a budget larger than 8 sequences at full context can use is cut to that: 8 x 128 blocks
    assert size_pool(per_position=per, slots=8, model_context=8192, budget=2**40, requested=None) == (8192, 1024)
    # 1 GiB holds 364 blocks: one sequence of the full 8192 positions, or 8 of 2900 on average
    assert size_pool(per_position=per, slots=8, model_context=8192, budget=2**30, requested=None) == (8192, 364)
    assert size_pool(per_position=per, slots=8, model_context=8192, budget=2**25, requested=None) == (704, 11)
    assert size_pool(per_position=per, slots=8, model_context=8192, budget=None, requested=512) == (512, 64)
    with pytest.raises(UsageError, match="raise --kv-memory or lower --max-seq-len"):
        size_pool(per_position=per, slots=8, model_context=8192, budget=2**24, requested=2048)
    with pytest.raises(UsageError, match="holds not one block"):
        size_pool(per_position=per, slots=8, model_context=8192, budget=2**20, requested=None)


def test_generate_streams_on_a_terminal_and_says_what_it_loads(tiny_checkpoints):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "llamaforge", "generate", str(tiny_checkpoints.gguf), "-p", "hello",
                                           "--temperature", "0", "-n", "4", "--device", "cpu"],
                          encoding="utf-8", timeout=120)
    child.expect(r"loading tiny\.gguf \([\d.]+ KB, gguf, cpu\)")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    expected = "".join(Llama.build(tiny_checkpoints.gguf, device="cpu").stream_text_completion(
        "hello", 4, temperature=0))
    # (a first use of the C++ kernels may log their build on the same terminal: not part of the answer)
    out = "\n".join(line for line in child.before.replace("\r\n", "\n").split("\n") if "kernel" not in line)
    assert ("hello" + expected) in out
    assert "=====" not in child.before  # streamed: the batch separator is not printed


def test_serve_gives_the_pool_what_the_kv_budget_holds(tiny_checkpoints):
    httpx = pytest.importorskip("httpx")
    from tests.test_server import free_port

    port = free_port()
    # tiny model: 2 layers x 2 kv heads x head_dim 16 x (k, v) x 4 bytes = 512 B a position, 32 KiB a block of 64
    proc = subprocess.Popen([sys.executable, "-m", "llamaforge", "serve", str(tiny_checkpoints.gguf), "--port", str(port),
                             "--kv-memory", "40KB", "--device", "cpu", "--log-level", "warning", "-b", "128"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            assert proc.poll() is None, "the server exited"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        health = httpx.get(base + "/health").json()
        assert health["max_seq_len"] == 64  # 40 KB hold one block of 64 positions
        assert health["max_num_batched_tokens"] == 128  # -b, llama-server's name for --max-num-batched-tokens
        got = httpx.post(base + "/v1/completions", timeout=60, json={
            "prompt": "hello world", "max_tokens": 40, "temperature": 0}).json()["choices"][0]["text"]
    finally:
        proc.send_signal(2)
        out = proc.communicate(timeout=60)[0]
    assert "KV cache 1 block of 64 positions = 32.8 KB (budget 40.0 KB: --kv-memory), shared by up to 8 " \
           "sequences of up to 64 positions" in out
    expected = "".join(Llama.build(tiny_checkpoints.gguf, max_seq_len=64, device="cpu").stream_text_completion(
        "hello world", 40, temperature=0))  # decoded piece by piece, as the server does
    assert got == expected  # positions past the first few are right: the rotary tables cover the context


def test_aliases_and_hf_co_references_are_models_not_missing_paths(tmp_path, monkeypatch, capsys):
    """`llamaforge chat llama3.2` (an alias, as Ollama users write) reached the hub; it was 'does not exist'."""
    from llamaforge.cli.common import looks_like_path

    assert not any(map(looks_like_path, ["llama3.2", "smollm2", "org/name:Q4_K_M", "hf.co/org/name:Q8_0@v1"]))
    assert all(map(looks_like_path, ["model.gguf", "models/7B/x", "./llama3.2", "nosuchalias", "org/m.gguf"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for ref in ("llama3.2", "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M"):
        assert main(["generate", ref, "-p", "x"]) == 1
        err = capsys.readouterr().err
        assert "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err and "does not exist" not in err


def test_run_answers_one_message_from_words_and_stdin_as_ollama_does(tiny_checkpoints, monkeypatch, capsys):
    import io

    from llamaforge.cli.run import message

    gen = Llama.build(tiny_checkpoints.meta, max_seq_len=64, max_batch_size=1, device="cpu")
    expected = gen.chat_completion([[{"role": "user", "content": "notes. summarize the llama"}]], temperature=0,
                                   max_gen_len=6)[0]["generation"]["content"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("notes.\n"))  # stdin first, then the words (after a flag too)
    assert main(["run", str(tiny_checkpoints.meta), "--temperature", "0", "summarize", "-n", "6", "the", "llama"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n" and "loading meta" in captured.err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["run", "/nonexistent/model.gguf"]) == 2  # nothing to answer, said before anything loads
    assert "nothing to answer" in capsys.readouterr().err

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert message([], Terminal("")) is None  # no words on a terminal: a chat
    assert message(["hi", "there"], Terminal("")) == "hi there"


@pytest.mark.parametrize("command", [["run", "the", "llama"], ["generate", "-p", "the llama", "--stream"]])
def test_a_reader_that_left_ends_the_command_quietly(tiny_checkpoints, command):
    """`llamaforge run MODEL ... | head -c 5`: the write after the reader left was a BrokenPipeError traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "llamaforge", command[0], str(tiny_checkpoints.meta),
                               "--temperature", "0", "-n", "4", *command[1:]],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr, proc.stderr
