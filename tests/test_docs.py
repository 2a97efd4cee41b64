"""The docs as a reader meets them: every block of README.md and docs/*.md marked runnable (the
line before its fence is exactly `<!-- runnable -->`) runs as written, from the repository
root, against real processes; README's first command (its serve-and-ask part) does what it
says; every relative link resolves inside the repository; every committed result is cited;
docs/configuration.md is what the argument parser prints.

Blocks that talk to a server (they name `:8000`, or the ZeroMQ endpoint's `:5557`) share one
`minivllm serve`, started once with the tools template and a ZeroMQ endpoint: the test puts its
ports in their place (and in $URL and $OPENAI_BASE_URL, which the example scripts read).
Install and test commands are never marked: `.ci/run` runs those."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

from bench.server_proc import ServeProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- runnable -->"
BLOCK_TIMEOUT_S = 600  # a generous bound on one block: some load the model on a loaded machine
RUNNERS = {"bash": ["bash", "-euo", "pipefail"], "python": [sys.executable]}
SERVER_PORTS = re.compile(r"(?<=:)(8000|5557)\b")  # in a URL or endpoint: host:8000
NEVER_RUNNABLE = re.compile(r"\b(pip install|apt-get|pytest)\b")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    path: Path
    line: int       # of the opening fence, 1-based
    lang: str
    code: str
    runnable: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, start = opening.group(1), i
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            i += 1
        marked = start > 0 and lines[start - 1].rstrip() == MARK
        yield Block(path, start + 1, opening.group(2), "\n".join(lines[start + 1:i]) + "\n",
                    marked)
        i += 1


RUNNABLE = [b for path in doc_files() for b in fenced_blocks(path) if b.runnable]


@pytest.fixture(scope="module")
def shared_server() -> Iterator[dict[str, str]]:
    """One `minivllm serve` for every block that needs one: its ports in place of the docs'."""
    zmq_port = free_port()
    srv = ServeProcess(["--zmq-endpoint", f"tcp://127.0.0.1:{zmq_port}",
                        "--chat-template", "examples/tool_chat_template_smollm2.jinja",
                        "--tool-call-parser", "hermes"], cwd=str(ROOT), env=_tree_env())
    try:
        yield {"8000": srv.url.rsplit(":", 1)[1], "5557": str(zmq_port)}
    finally:
        srv.stop()


def _tree_env(**extra: str) -> dict[str, str]:
    """This tree's minivllm first on the path, for `python` and for the `minivllm` script."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def test_every_marked_block_is_one_a_test_may_run():
    for block in RUNNABLE:
        assert block.lang in RUNNERS, f"{block.where}: a runnable block must be bash or python"
        assert not NEVER_RUNNABLE.search(block.code), (
            f"{block.where}: installs and the test suite are .ci/run's, not runnable blocks")


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_runnable_block(block: Block, request, tmp_path):
    code, env = block.code, _tree_env()
    if SERVER_PORTS.search(code):
        ports: dict[str, str] = request.getfixturevalue("shared_server")
        code = SERVER_PORTS.sub(lambda m: ports[m.group(1)], code)
        env.update(URL=f"http://127.0.0.1:{ports['8000']}",
                   OPENAI_BASE_URL=f"http://127.0.0.1:{ports['8000']}/v1",
                   OPENAI_API_KEY="unused")
    script = tmp_path / ("block.py" if block.lang == "python" else "block.sh")
    script.write_text(code, encoding="utf-8")
    try:
        res = subprocess.run([*RUNNERS[block.lang], str(script)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.where}: still running after {BLOCK_TIMEOUT_S} s\n"
                    f"{_tail(exc.stdout)}\n{_tail(exc.stderr)}")
    assert res.returncode == 0, (f"{block.where}: exit {res.returncode}\n--- stdout\n"
                                 f"{_tail(res.stdout)}\n--- stderr\n{_tail(res.stderr)}")


def _tail(text: Optional[str | bytes], chars: int = 4000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-chars:]


def readme_commands() -> list[str]:
    """README's two setup commands: serve and answer, then set up and pass the tests."""
    setups = [b.code.strip() for b in fenced_blocks(ROOT / "README.md")
              if b.lang == "bash" and "pip install" in b.code]
    assert len(setups) >= 2, "README.md has lost one of its two commands"
    return setups[:2]


def test_the_first_command_serves_answers_and_stops(tmp_path):
    """README's first command, past its install: examples/quickstart.sh, as written."""
    first = readme_commands()[0]
    assert first.endswith("&& bash examples/quickstart.sh"), first
    log = tmp_path / "serve.log"
    res = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, capture_output=True,
                         text=True, timeout=BLOCK_TIMEOUT_S,
                         env=_tree_env(PORT=str(free_port()), LOG=str(log)))
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert '"finish_reason":"stop"' in res.stdout and "Paris" in res.stdout, res.stdout
    pid = int(re.search(r"minivllm serve \(pid (\d+)\)", res.stdout).group(1))
    assert not Path(f"/proc/{pid}").exists(), "the script left its server running"
    assert "minivllm: serving" in log.read_text(), "its log is not in the file it names"


def test_the_second_command_is_the_one_ci_runs():
    second = readme_commands()[1]
    assert second in (ROOT / ".ci" / "run").read_text(), "README and .ci/run disagree"


# ---- links and citations ---------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
                  r"|^\s*\[[^\]]+\]:\s*(\S+)|<img\s[^>]*src=\"([^\"]+)\"", re.M)


def relative_links(path: Path) -> Iterator[tuple[int, str]]:
    """(line, target) of every link and image outside code, anchors and URLs left out."""
    text = path.read_text(encoding="utf-8")
    # code is not a link: blank fenced blocks and inline code out, keeping the line numbers
    text = re.sub(r"^(```+|~~~+).*?^\1", lambda m: "\n" * m.group(0).count("\n"), text,
                  flags=re.S | re.M)
    text = re.sub(r"`[^`\n]+`", "``", text)
    for match in LINK.finditer(text):
        target = next(g for g in match.groups() if g)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        yield text.count("\n", 0, match.start()) + 1, target.split("#", 1)[0]


def test_every_relative_link_resolves_inside_the_repository():
    problems = []
    for path in doc_files():
        for line, target in relative_links(path):
            resolved = (path.parent / target).resolve()
            where = f"{path.relative_to(ROOT)}:{line}: {target}"
            if not resolved.is_relative_to(ROOT):
                problems.append(f"{where} leaves the repository")
            elif not resolved.exists():
                problems.append(f"{where} does not exist")
    assert not problems, "\n".join(problems)


def test_every_committed_result_is_cited():
    cited = {(path.parent / target).resolve() for path in doc_files()
             for _, target in relative_links(path)}
    results = ROOT / "bench" / "results"
    uncited = sorted(str(f.relative_to(ROOT)) for f in results.rglob("*")
                     if f.is_file() and f.resolve() not in cited)
    assert not uncited, ("linked from neither README.md nor docs/*.md:\n" + "\n".join(uncited))


def test_the_configuration_reference_is_the_parsers():
    from minivllm.cli import configuration_reference

    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == configuration_reference(), (
        "docs/configuration.md differs from the parser: run "
        "`python -m minivllm.cli reference > docs/configuration.md`")
