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
