"""`llamaforge chat`: the session's commands and context handling on the tiny model, and the real REPL in a
pty (pexpect) on the default model: line editor, history across sessions, \"\"\" blocks, /commands, Ctrl-C, Ctrl-D."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys

import pytest

from llamaforge import Llama
from llamaforge.cli.chat import ChatSession, Settings
from llamaforge.cli.line_input import LineReader, read_message


def settings(**kw) -> Settings:
    base = dict(temperature=0.0, top_p=0.9, top_k=None, max_gen_len=6, verbose=False)
    return Settings(argparse.Namespace(**{**base, **kw}))


@pytest.fixture(scope="module")
def tiny_llama(tiny_checkpoints):
    return Llama.build(tiny_checkpoints.meta, max_seq_len=128, max_batch_size=1, device="cpu")


class Script(LineReader):
    """A reader that replays typed lines."""

    def __init__(self, lines):
        super().__init__(show_prompt=False)
        self.lines = list(lines)

    def read(self, prompt: str) -> str:
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)


def test_triple_quoted_blocks_keep_blank_lines_and_empty_lines_are_skipped():
    reader = Script(["", "   ", '"""first line', "", "third", 'end"""', '"""one line"""', "plain"])
    assert read_message(reader) == "first line\n\nthird\nend"
    assert read_message(reader) == "one line"
    assert read_message(reader) == "plain"
    with pytest.raises(EOFError):
        read_message(reader)


def test_a_full_context_drops_the_oldest_turns_but_keeps_the_system_prompt(tiny_llama, capsys):
    session = ChatSession(tiny_llama, settings(max_gen_len=6), "be brief")
    for text in ["hello world the llama", "the model is", "meaning of life", "a sea otter", "theory of relativity states"]:
        session.answer(text)
    out = capsys.readouterr().out
    assert "[context full: dropped the" in out
    assert session.messages[0] == {"role": "system", "content": "be brief"}
    assert session.messages[-2]["content"] == "theory of relativity states"
    assert len(tiny_llama.chat_format.encode_dialog(session.messages[:-1])) <= tiny_llama.max_seq_len
    roles = [m["role"] for m in session.messages[1:]]
    assert roles == ["user", "assistant"] * (len(roles) // 2)
    # a message that cannot fit even alone is taken back with a note, and the session goes on
    session.answer("hello world " * 80)
    assert "shorten it" in capsys.readouterr().out
    assert session.messages[-2]["content"] == "theory of relativity states"


def test_answers_are_the_apis_greedy_answers(tiny_llama, capsys):
    session = ChatSession(tiny_llama, settings(max_gen_len=5), None)
    session.answer("hello world")
    expected = tiny_llama.chat_completion([[{"role": "user", "content": "hello world"}]], max_gen_len=5,
                                          temperature=0)[0]["generation"]["content"]
    assert session.messages[-1]["content"] == expected.strip()


def test_set_validates_values_in_the_commands_words(tiny_llama, capsys):
    session = ChatSession(tiny_llama, settings(), None)
    assert session.command("/set temperature 0.3", confirm=lambda q: True)
    assert session.settings.values["temperature"] == 0.3
    session.command("/set top-k 5", confirm=lambda q: True)
    session.command("/set top_k none", confirm=lambda q: True)
    assert session.settings.values["top_k"] is None
    for bad, words in [("/set temperature hot", "temperature takes a number"), ("/set top_p 1.5", "top_p must be in"),
                       ("/set colour red", "no setting 'colour'")]:
        with pytest.raises(ValueError, match=words):
            session.command(bad, confirm=lambda q: True)
    assert not session.command("/bye", confirm=lambda q: True)


def test_reset_asks_first_and_save_load_round_trip(tiny_llama, tmp_path, capsys):
    session = ChatSession(tiny_llama, settings(), "sys")
    session.answer("hello")
    session.command("/reset", confirm=lambda q: False)
    assert len(session.messages) == 3 and "kept" in capsys.readouterr().out
    session.command(f"/save {tmp_path / 'c.json'}", confirm=None)
    assert (os.stat(tmp_path / "c.json").st_mode & 0o777) == 0o666 & ~_umask()
    session.command("/reset", confirm=lambda q: True)
    assert session.messages == [{"role": "system", "content": "sys"}]
    session.command("/set temperature 0.7", confirm=None)
    session.command(f"/load {tmp_path / 'c.json'}", confirm=None)
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.settings.values["temperature"] == 0.0  # settings travel with the conversation
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "assistant", "content": "hi"}]))
    with pytest.raises(ValueError, match="take turns, starting with the user"):
        session.command(f"/load {tmp_path / 'bad.json'}", confirm=None)
    with pytest.raises(ValueError, match="does not exist"):
        session.command(f"/load {tmp_path / 'none.json'}", confirm=None)
    assert len(session.messages) == 3  # a failed load changes nothing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the real thing in a terminal ------------------------------------------------------------------------

# prompt_toolkit turns bracketed paste on while it reads a line and off when the line is accepted
READING, ACCEPTED = "\x1b[?2004h", "\x1b[?2004l"
INTERRUPTED_AT_PROMPT = "(Ctrl-D or /bye leaves)"  # cli/chat.run's answer to Ctrl-C at the prompt


def spawn_chat(tmp_path, *extra, sigint=signal.SIG_DFL):
    """`llamaforge chat` in a pty, started with SIGINT at `sigint` (not at whatever the test runner inherited:
    a runner started by `sh -c '...' &` passes SIGINT on ignored)."""
    pexpect = pytest.importorskip("pexpect")
    pytest.importorskip("prompt_toolkit")
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color")
    child = pexpect.spawn(sys.executable, ["-m", "llamaforge", "chat", "--temperature", "0", "-n", "12",
                                           "--max-seq-len", "256", *extra],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 120),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    child.expect("chatting with SmolLM2")
    child.expect_exact(READING)
    return child, pexpect


def type_line(child, line: str, *then: str) -> None:
    """Type a line, wait until it is accepted, then for each expected pattern; then for the next prompt."""
    child.send(line + "\r")
    child.expect_exact(ACCEPTED)
    for pattern in then:
        child.expect(pattern)
    child.expect_exact(READING)


def interrupt_a_story(child, pexpect) -> None:
    """Ask for a long story and Ctrl-C it once it streams: "[stopped]" must follow. A sampled story may end at
    EOS before the interrupt lands; the Ctrl-C then reaches the prompt, which prints its hint instead, and the
    story is asked for again (up to 3 times)."""
    for _ in range(3):
        child.send("Write a very long story about a dragon.\r")
        child.expect_exact(ACCEPTED)
        child.expect(r"\w\w+ \w+")  # the answer has started (it prints after the line editor left raw mode)
        child.sendintr()
        seen = child.expect([r"\[stopped\]", re.escape(INTERRUPTED_AT_PROMPT), pexpect.TIMEOUT], timeout=30)
        if seen == 2:
            raise AssertionError(f"a Ctrl-C sent while the answer streamed stopped nothing in 30 s; the output's "
                                 f"end: {child.before[-1500:]!r}")
        child.expect_exact(READING)
        if seen == 0:
            return
    raise AssertionError("three answers ended before a Ctrl-C sent while each streamed")


@pytest.mark.slow
def test_the_repl_in_a_pty_on_the_default_model(tmp_path):
    # a context long enough that the story below streams for many seconds (at 256 tokens it streamed for ~2 s)
    child, pexpect = spawn_chat(tmp_path, "--verbose", "--max-seq-len", "2048")
    type_line(child, "/help", "/save FILE")
    type_line(child, "")  # an empty line is nothing, not the end
    for line in ('"""', "What is the capital", ""):  # a block over several lines, with a blank one
        type_line(child, line)
    type_line(child, 'of France?"""', "Paris", r"tokens/s; prompt \d+ tokens")  # --verbose: speed after it
    type_line(child, "/set temperature 0.3", "temperature = 0.3")
    type_line(child, f"/save {tmp_path / 'chat.json'}", "saved 2 messages")
    child.send("/reset\r")
    child.expect(r"\[y/N\]")
    type_line(child, "y", "conversation cleared")
    type_line(child, "/set max_gen_len 1500", "max_gen_len = 1500")
    interrupt_a_story(child, pexpect)  # Ctrl-C stops the answer, not the session
    type_line(child, "/load " + str(tmp_path / "chat.json"), "loaded 2 messages")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["messages"][0] == {"role": "user", "content": "What is the capital\n\nof France?"}
    assert "Paris" in saved["messages"][1]["content"]

    # history is kept across sessions: Up brings back the last line typed in the previous one
    child, _ = spawn_chat(tmp_path)
    child.send("\x1b[A")
    child.expect("/load ")
    type_line(child, "", "loaded 2 messages")
    # a paste with blank lines is one message (bracketed paste), not three, and not the end of the session
    child.send("\x1b[200~Say hi.\r\n\r\nThen stop.\x1b[201~\r")
    child.expect_exact(ACCEPTED)
    child.expect_exact(READING)
    type_line(child, f"/save {tmp_path / 'pasted.json'}", "saved 4 messages")
    child.send("/bye\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert json.loads((tmp_path / "pasted.json").read_text())["messages"][2]["content"] == "Say hi.\n\nThen stop."


@pytest.mark.slow
def test_ctrl_c_stops_an_answer_though_the_chat_was_started_with_sigint_ignored(tmp_path):
    # a shell without job control starts `cmd &` with SIGINT ignored and the exec keeps it; Python then raises
    # no KeyboardInterrupt, and every Ctrl-C sent while an answer streamed was ignored (found in the pty test
    # above, in suites started in the background) until `llamaforge chat` took the key back
    child, pexpect = spawn_chat(tmp_path, "--max-seq-len", "2048", "-n", "1500", "--temperature", "0.7",
                                sigint=signal.SIG_IGN)
    interrupt_a_story(child, pexpect)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_from_a_pipe_notes_go_to_stderr_and_stdout_holds_the_answers(tiny_llama, capsys):
    """The context notes were printed among the answers on stdout, breaking one line per answer in a pipe."""
    session = ChatSession(tiny_llama, settings(max_gen_len=6), None, interactive=False)
    texts = ["hello world the llama", "the model is", "meaning of life", "a sea otter", "theory of relativity states"]
    for text in texts:
        session.answer(text)
    captured = capsys.readouterr()
    assert "[context full: dropped the" in captured.err and "[" not in captured.out
    assert captured.out.count("\n") == len(texts)  # not splitlines: a random model may answer a \\v (vertical tab)
