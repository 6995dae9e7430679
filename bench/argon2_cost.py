"""What checking one agent token costs on this machine, with the tool's argon2 parameters.

    python bench/argon2_cost.py [--runs 20]

Prints one line per figure: the format-and-checksum check a server runs
first, one argon2id verification in Python (argon2-cffi) and, where node and
server/node_modules are present, in Node (node-argon2, what the Kan server
uses), and the peak memory one verification adds to a process. Medians over
--runs runs after a warm-up. docs/tokens.md records one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import agent_identity_admin as tool  # noqa: E402

# Peak resident memory from /proc (Linux): ru_maxrss would carry the parent's
# peak across exec and say nothing.
MEMORY_PROBE = """
import sys
from argon2 import PasswordHasher

def peak_kib():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0])

hasher = PasswordHasher()
stored, token = sys.stdin.read().split()
before = peak_kib()
hasher.verify(stored, token)
print((peak_kib() - before) / 1024)
"""

NODE_PROBE = """
import { createRequire } from "node:module";
const require = createRequire(process.argv[1] + "/");
const argon2 = require("argon2");
const [stored, token, runs] = [process.argv[2], process.argv[3], Number(process.argv[4])];
await argon2.verify(stored, token);
const times = [];
for (let i = 0; i < runs; i++) {
  const start = process.hrtime.bigint();
  await argon2.verify(stored, token);
  times.push(Number(process.hrtime.bigint() - start) / 1e6);
}
times.sort((a, b) => a - b);
console.log(JSON.stringify({ median: times[Math.floor(times.length / 2)] }));
"""


def median_ms(call, runs: int) -> float:
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    from argon2 import PasswordHasher

    hasher = PasswordHasher()
    token = tool.new_token(tool.new_public_id())
    stored = tool.hash_token(token)
    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
          f"argon2id t={hasher.time_cost} m={hasher.memory_cost} KiB p={hasher.parallelism}")

    check = median_ms(lambda: tool.parse_token(token), args.runs * 50)
    print(f"format and checksum check: {check * 1000:.1f} µs median")
    print(f"argon2id hash (create, rotate), Python: {median_ms(lambda: tool.hash_token(token), args.runs):.1f} ms median")
    print(f"argon2id verify, Python: {median_ms(lambda: hasher.verify(stored, token), args.runs):.1f} ms median")

    node_modules = REPO / "server" / "node_modules"
    if shutil.which("node") and (node_modules / "argon2").exists():
        completed = subprocess.run(
            ["node", "--input-type=module", "-e", NODE_PROBE, str(node_modules), stored, token, str(args.runs)],
            capture_output=True, text=True, timeout=300,
        )
        node = json.loads(completed.stdout)["median"]
        print(f"argon2id verify, Node (node-argon2): {node:.1f} ms median")
    else:
        print("argon2id verify, Node: not measured (needs node and server/node_modules: npm ci in server/)")

    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE], input=f"{stored} {token}",
                           capture_output=True, text=True, timeout=60, check=True)
    print(f"peak memory one verification adds to a process: {float(probe.stdout):.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
