"""The installed `minivllm` command, as a user runs it (a real subprocess)."""
import argparse
import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

from minivllm.cli import _subcommands, build_parser


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minivllm.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_chat_answers_with_the_embedded_model():
    res = _run("chat", "--message", "What is the capital of France?", "--max-tokens", "24")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_bad_arguments_exit_with_a_clear_error(tmp_path):
    res = _run("generate", "hi", "--model", str(tmp_path / "missing"))
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = _run("generate", "hi", "--temperature", "-1")
    assert res.returncode == 2 and "temperature" in res.stderr


def test_run_batch_killed_and_rerun_gives_every_result_once(tmp_path):
    from bench.run_batch_resume import kill_and_resume

    run = kill_and_resume(tmp_path, 12, kill_after=4, concurrency=2, max_tokens=8)
    assert run["killed_before_the_end"] and run["results_at_kill"] >= 4, run
    assert run["rerun_exit"] == 0 and run["kept_unchanged"], run
    assert run["results"] == run["distinct"] == 12 and run["all_ids"], run
    assert run["ok_status"] == 12  # chat and completion lines alike answered 200
    assert run["left_after_rerun"] == {"processes": [], "shm": [], "sockets": []}, run


def test_run_batch_refuses_a_bad_line_before_loading(tmp_path):
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", '
                     '"body": {"prompt": "x"}}\n{"custom_id": "a", "url": "/v1/embeddings"}\n')
    res = _run("run-batch", "-i", str(batch), "-o", str(tmp_path / "out.jsonl"))
    assert res.returncode == 2 and "line 2" in res.stderr and "url" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out.jsonl").exists()


# ---- chat, as a person at a terminal drives it ------------------------------------------------

class _Terminal:
    """`minivllm chat` on a pseudo-terminal of its own, stdin, stdout and stderr, as in a
    terminal window (its controlling terminal, so that a typed Ctrl-C is a SIGINT from the
    line discipline; input() writes its prompt to stderr there)."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()

        def own_terminal() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # As a shell starts a foreground job: a test run started in the background
            # (`pytest &`) ignores SIGINT, which the child would inherit and keep ignoring.
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self.proc = subprocess.Popen([sys.executable, "-m", "minivllm.cli", "chat", *args],
                                     stdin=slave, stdout=slave, stderr=slave,
                                     preexec_fn=own_terminal)
        os.close(slave)
        self.output = ""
        self.reads: list[str] = []  # each read of the terminal, as it came

    def expect(self, text: str, after: int = 0, timeout: float = 300.0) -> int:
        """Read until `text` shows after offset `after`; where it ends."""
        deadline = time.monotonic() + timeout
        while (at := self.output.find(text, after)) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not self._read(0.5):
                raise AssertionError(f"no {text!r} (exit {self.proc.poll()}): {self.output!r}")
            self._read(min(left, 1.0))
        return at + len(text)

    def _read(self, timeout: float) -> bool:
        if not select.select([self.master], [], [], timeout)[0]:
            return False
        try:
            chunk = os.read(self.master, 4096).decode(errors="replace")
        except OSError:  # EIO: the child closed the terminal
            return False
        self.output += chunk
        self.reads.append(chunk)
        return bool(chunk)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self, timeout: float = 120.0) -> int:
        """The exit status, the terminal read meanwhile (a full one would block the child)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(10)
        os.close(self.master)
        return code


def test_chat_streams_the_answer_and_ctrl_c_leaves_without_a_traceback():
    term = _Terminal("--max-tokens", "1000")
    start = term.expect("you> ")
    term.type("Count from 1 to 1000.\n")
    answer = term.expect("assistant> ", start)
    term.expect("1", answer)  # the answer's first tokens show while the rest is computed...
    assert "you> " not in term.output[answer:], term.output
    term.type("\x03")          # ...and Ctrl-C interrupts it
    code = term.finish()
    assert code in (0, 130), (code, term.output)
    assert "Traceback" not in term.output, term.output


def test_chat_handles_slash_exit_itself():
    script = "What is the capital of France?\n/exit\nThis line is never sent.\n"
    res = subprocess.run([sys.executable, "-m", "minivllm.cli", "chat", "--max-tokens", "24"],
                         input=script, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("assistant> ") == 1 and "Paris" in res.stdout, res.stdout
    assert "Traceback" not in res.stderr


def test_every_flag_has_help_that_shows_its_default():
    for name, sub in _subcommands(build_parser()).items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"minivllm {name} {action.option_strings or action.dest}"
            text = formatter._expand_help(action)
            assert action.required or "(default: " in text, (name, action.dest, text)
    res = _run("serve", "--help")  # what a user sees: each flag's default, in one run
    assert res.returncode == 0 and "(default: 8000)" in res.stdout, res.stdout
    assert "(default: none, HTTP only)" in res.stdout and "(default: 16)" in res.stdout
