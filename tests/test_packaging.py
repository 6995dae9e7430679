"""The wheel: it builds with `python -m build`, says what it needs and under which license,
installs into a fresh virtual environment, and runs there as `agent-identity` and
`python -m agent_identity_admin`."""

import subprocess
import sys
import venv
import zipfile

import agent_identity_admin as tool
from tests import support


def test_the_built_wheel_installs_and_runs(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(support.REPO)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = dist.glob("*.whl")
    assert wheel.name == f"agent_identity-{tool.__version__}-py3-none-any.whl", "one source of the version"

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(f"agent_identity-{tool.__version__}.dist-info/METADATA").decode()
        entry_points = archive.read(f"agent_identity-{tool.__version__}.dist-info/entry_points.txt").decode()
        shipped_license = archive.read(f"agent_identity-{tool.__version__}.dist-info/licenses/LICENSE").decode()
    assert "agent_identity_admin.py" in names and not any(name.startswith("tests/") for name in names)
    assert "Requires-Python: >=3.10" in metadata
    runtime = sorted(line.split(": ", 1)[1] for line in metadata.splitlines()
                     if line.startswith("Requires-Dist:") and "extra ==" not in line)
    assert runtime == ["argon2-cffi>=23.1", "psycopg[binary]>=3.2"], "the two chosen dependencies, nothing else"
    assert "Classifier: Programming Language :: Python :: 3.10" in metadata
    assert "License-Expression: AGPL-3.0-only" in metadata and "License-File: LICENSE" in metadata
    assert shipped_license == (support.REPO / "LICENSE").read_text()
    assert shipped_license.startswith("                    GNU AFFERO GENERAL PUBLIC LICENSE\n")
    urls = sorted(line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Project-URL:"))
    assert urls == ["Homepage, https://kan.bn", "Issues, https://github.com/kanbn/kan/issues",
                    "Source, https://github.com/kanbn/kan"]
    assert "agent-identity = agent_identity_admin:main" in entry_points

    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    helped = subprocess.run([str(environment / "bin" / "agent-identity"), "help"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: agent-identity"), helped.stderr
    version = subprocess.run([str(python), "-m", "agent_identity_admin", "--version"], capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)
    assert version.stdout == f"agent-identity {tool.__version__}\n"
