"""What checking one agent token costs on this machine, with the tool's argon2 parameters.

    python bench/argon2_cost.py [--runs 200]

Prints one line per figure: the format-and-checksum check a server runs
first, one argon2id verification in Python (argon2-cffi) and, where node and
server/node_modules are present, in Node (node-argon2, what the Kan server
uses), and the peak memory one verification adds to a process, each beside its
target (2 ms median, 4 MiB); then the same for a hash made with argon2-cffi's
defaults, as versions before 0.2 stored them. Medians over --runs runs after a
warm-up; exit 1 if a target is missed. docs/tokens.md records one run.
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


VERIFY_TARGET_MS = 2.0
MEMORY_TARGET_MIB = 4.0


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
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()

    from argon2 import PasswordHasher

    token = tool.new_token(tool.new_public_id())
    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}")
    check = median_ms(lambda: tool.parse_token(token), args.runs * 5)
    print(f"format and checksum check: {check * 1000:.1f} µs median")
    missed = 0
    for label, hasher, runs in (("the tool's", tool.token_hasher(), args.runs),
                                ("argon2-cffi defaults, before 0.2", PasswordHasher(), max(args.runs // 20, 5))):
        stored = hasher.hash(token)
        print(f"\nargon2id t={hasher.time_cost} m={hasher.memory_cost} KiB p={hasher.parallelism} ({label})")
        print(f"  hash (create, rotate), Python: {median_ms(lambda: hasher.hash(token), runs):.2f} ms median")
        figures = {"verify, Python (argon2-cffi)": median_ms(lambda: hasher.verify(stored, token), runs)}
        node_modules = REPO / "server" / "node_modules"
        if shutil.which("node") and (node_modules / "argon2").exists():
            completed = subprocess.run(
                ["node", "--input-type=module", "-e", NODE_PROBE, str(node_modules), stored, token, str(runs)],
                capture_output=True, text=True, timeout=300,
            )
            figures["verify, Node (node-argon2)"] = json.loads(completed.stdout)["median"]
        else:
            print("  verify, Node: not measured (needs node and server/node_modules: npm ci in server/)")
        for name, median in figures.items():
            over = median > VERIFY_TARGET_MS
            missed += over and label == "the tool's"
            print(f"  {name}: {median:.2f} ms median (target {VERIFY_TARGET_MS:g} ms: {'over' if over else 'ok'})")
        probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE], input=f"{stored} {token}",
                               capture_output=True, text=True, timeout=60, check=True)
        memory = float(probe.stdout)
        missed += memory > MEMORY_TARGET_MIB and label == "the tool's"
        print(f"  peak memory one verification adds to a process: {memory:.1f} MiB "
              f"(target {MEMORY_TARGET_MIB:g} MiB: {'over' if memory > MEMORY_TARGET_MIB else 'ok'})")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
