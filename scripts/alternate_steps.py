#!/usr/bin/env python3
"""Alternate training-step benchmarks and compare their medians.

Runs each command in turn, ROUNDS times, each with STEPS as its last argument, and reads the
lines `step I: loss L, Ts (forward Fs, backward Bs, ...)` that `trainer/examples/bench_step.rs`
and `scripts/bench_step.py` print. Step 0 (warm-up) is left out. Per command: the median and
range over all rounds of the step, forward and backward times. Alternating puts every command
under the same drift of a shared machine; compare only commands of one run.

    scripts/alternate_steps.py ROUNDS STEPS NAME=COMMAND [NAME=COMMAND ...]

e.g. scripts/alternate_steps.py 3 5 candle=target/release/examples/bench_step \\
         torch="python3 scripts/bench_step.py"
"""
import re
import statistics
import subprocess
import sys

STEP = re.compile(
    r"step (\d+): loss [0-9.]+, ([0-9.]+)s \(forward ([0-9.]+)s, backward ([0-9.]+)s")


def main():
    if len(sys.argv) < 4 or any("=" not in a for a in sys.argv[3:]):
        sys.exit(__doc__)
    rounds, steps = int(sys.argv[1]), sys.argv[2]
    cmds = [a.split("=", 1) for a in sys.argv[3:]]
    times = {name: {"step": [], "forward": [], "backward": []} for name, _ in cmds}
    for _ in range(rounds):
        for name, cmd in cmds:
            run = subprocess.run(f"{cmd} {steps}", shell=True, capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"{name}: exit status {run.returncode}\n{run.stderr[-2000:]}")
            for m in STEP.finditer(run.stdout):
                if int(m.group(1)) > 0:
                    for key, g in (("step", 2), ("forward", 3), ("backward", 4)):
                        times[name][key].append(float(m.group(g)))
    for name, t in times.items():
        if not t["step"]:
            sys.exit(f"{name}: no step lines in its output")
        parts = [f"{k} {statistics.median(v):.3f} s ({min(v):.3f}-{max(v):.3f})" for k, v in t.items()]
        print(f"{name}: " + ", ".join(parts) + f"; {len(t['step'])} steps")


if __name__ == "__main__":
    main()
