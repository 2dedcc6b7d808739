"""Summarise a py-spy raw (collapsed) profile as text: where one process spent its samples.

    py-spy record -f raw -o prof.txt --subprocesses -- python benchmarks/fanout.py ...
    python benchmarks/flame_summary.py prof.txt --process "trioserve serve" [--top 25]

Prints the share of samples by leaf function (self) and by any function on
the stack (inclusive), for the process whose command line contains the
``--process`` text. The idle wait (epoll) is counted apart, so the shares
are of the time the process was busy.
"""

from __future__ import annotations

import argparse
import collections
import re

FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")
IDLE = ("epoll", "poll (", "select (", "get_events", "wait (")


def load(path: str, process: str) -> collections.Counter[tuple[str, ...]]:
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if not frames or process not in frames[0]:
                continue
            names = []
            for frame in frames[1:]:
                m = FRAME.match(frame)
                names.append(f"{m.group(1)} ({m.group(2).split('/')[-1]})" if m else frame)
            stacks[tuple(names)] += int(count)
    return stacks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile")
    p.add_argument("--process", default="trioserve serve")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    stacks = load(args.profile, args.process)
    idle = sum(n for s, n in stacks.items() if s and any(k in s[-1] for k in ("epoll", "get_events")))
    busy = sum(stacks.values()) - idle
    print(f"{args.process}: {sum(stacks.values())} samples, {idle} idle (waiting in epoll), {busy} busy")
    selfs: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for s, n in stacks.items():
        if not s or any(k in s[-1] for k in ("epoll", "get_events")):
            continue
        selfs[s[-1]] += n
        for name in set(s):
            incl[name] += n
    print(f"\nself (leaf) share of busy samples, top {args.top}:")
    for name, n in selfs.most_common(args.top):
        print(f"  {n / busy:6.1%}  {name}")
    print(f"\ninclusive share of busy samples, top {args.top}:")
    for name, n in incl.most_common(args.top + 10)[: args.top + 10]:
        print(f"  {n / busy:6.1%}  {name}")


if __name__ == "__main__":
    main()
