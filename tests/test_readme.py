"""The README's sample output is what a real run prints: examples/quickstart.py is run
against the test server and its output compared with the README's transcript, line by
line, once ids, times, secrets and the database's name and address are masked."""

import re
import subprocess
import sys

from tests import support

MASKS = [
    (re.compile(r"kan_agent_[0-9A-Za-z]{12}_\S+.*"), "kan_agent_<id>_<secret>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"), "<time>"),
    (re.compile(r"\b[0-9A-Za-z]{12}\b"), "<id>"),  # public ids (a 12-letter word is masked alike in both)
    (re.compile(r"database \S+ (at \S+|on socket \S+|on the local socket, port \d+) as role \S+"), "<target>"),
    (re.compile(r"\s+"), " "),
]


def shape(text: str) -> list[str]:
    lines = []
    for line in text.strip().splitlines():
        for pattern, mask in MASKS:
            line = pattern.sub(mask, line)
        lines.append(line.strip())
    return lines


def readme_transcript() -> str:
    text = (support.REPO / "README.md").read_text()
    start = text.index("```text\n# A Kan database with workspace AcmeDemo0001") + len("```text\n")
    return text[start:text.index("```", start)]


def test_the_readme_shows_what_the_quick_start_prints(server_dsn):
    env = support.cli_env(None, COLUMNS="80", **{support.TEST_DSN_VARIABLE: server_dsn})
    done = subprocess.run([sys.executable, str(support.REPO / "examples" / "quickstart.py")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=support.REPO)
    assert done.returncode == 0, done.stderr
    real, shown = shape(done.stdout), shape(readme_transcript())
    assert len(real) == len(shown)
    for number, (printed, documented) in enumerate(zip(real, shown), 1):
        assert printed == documented, f"README transcript line {number}"


def test_the_readme_says_how_to_run_the_installed_tool():
    text = (support.REPO / "README.md").read_text()
    assert ". .venv/bin/activate" in text and ".venv/bin/agent-identity help" in text
