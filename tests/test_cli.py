"""The installed `minivllm` command, as a user runs it (a real subprocess)."""
import subprocess
import sys


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
