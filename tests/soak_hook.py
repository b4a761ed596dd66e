"""A test-only window into a running daemon's tables (the soak review).

    python tests/soak_hook.py OUTDIR MODULE [ARGS...]

runs MODULE's main() (sendooway_front.cli or sendooway_auth.cli) as the
real program, after installing a SIGUSR2 handler that writes
OUTDIR/tables-PID.json: the length of every container (dict, list, set,
deque) held by a module of the product or by an instance of one of its
classes, by "module.Class.attribute" (summed over the instances, with
the instance count under "module.Class"), and the asyncio tasks and
threads of the process. Nothing is added to the product: the tests read
its own state from outside, as a debugger would, and compare the sizes
after a warm-up and after many more sessions. With
SENDOOWAY_SOAK_TRACEMALLOC set, each dump also appends to
OUTDIR/tracemalloc-PID.txt the allocations that grew most since the last
one (tracemalloc), by traceback.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import signal
import sys
import threading

CONTAINERS = (dict, list, set, frozenset, collections.deque, tuple)


def _ours(obj) -> bool:
    module = getattr(type(obj), "__module__", None)
    return isinstance(module, str) and module.startswith(("sendooway_", "sendooway."))


def sizes() -> dict[str, int]:
    out: dict[str, int] = collections.Counter()
    gc.collect()  # what only waits for the collector is no leak
    for name, mod in list(sys.modules.items()):
        if not name.startswith("sendooway_") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if attr.startswith("__"):
                continue
            if isinstance(value, CONTAINERS) and not isinstance(value, tuple) and not attr.isupper():
                out[f"{name}.{attr}"] += len(value)
            elif _ours(value) and hasattr(value, "__dict__"):
                for a, v in list(vars(value).items()):
                    if isinstance(v, CONTAINERS) and not isinstance(v, tuple):
                        out[f"{name}.{attr}.{a}"] += len(v)
    for obj in gc.get_objects():
        if not _ours(obj) or isinstance(obj, type):
            continue
        cls = f"{type(obj).__module__}.{type(obj).__qualname__}"
        out[cls] += 1
        try:
            attrs = vars(obj)
        except TypeError:
            continue
        for a, v in list(attrs.items()):
            if isinstance(v, CONTAINERS) and not isinstance(v, tuple):
                out[f"{cls}.{a}"] += len(v)
    import asyncio
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)
             and not o.is_closed()]
    out["(asyncio tasks)"] = sum(len(asyncio.all_tasks(lp)) for lp in loops)  # (for the one loop)
    out["(threads)"] = threading.active_count()
    return dict(out)


def main() -> None:
    outdir, module, *args = sys.argv[1:]

    def dump(_sig, _frame) -> None:
        path = os.path.join(outdir, f"tables-{os.getpid()}.json")
        try:
            found = sizes()
        except BaseException as exc:  # never into the daemon's own code
            import traceback
            found = {"(hook failed)": 1, "error": traceback.format_exc()}
        with open(path + ".tmp", "w") as f:
            json.dump(found, f)
        os.replace(path + ".tmp", path)

    def between_callbacks(handler):
        """`handler` run by the event loop between two of its callbacks,
        where the product's tables are whole. A Python signal handler runs
        between any two bytecodes: in UpstreamPool.release, after the new
        connection is added and before the eviction that keeps the pool at
        MAX_IDLE, it read 33 idle entries for a cap of 32 (seen once, in a
        loaded full run on a fresh Debian). With no loop running: at once."""
        import asyncio

        def handle(sig, frame) -> None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                handler(sig, frame)
            else:
                loop.call_soon_threadsafe(handler, sig, None)
        return handle

    if os.environ.get("SENDOOWAY_SOAK_TRACEMALLOC"):
        import tracemalloc

        tracemalloc.start(8)
        previous = []

        def dump_and_trace(sig, frame) -> None:
            dump(sig, frame)
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
            lines = []
            if previous:
                for stat in snap.compare_to(previous[0], "traceback")[:12]:
                    lines.append(f"{stat.size_diff:+d} B {stat.count_diff:+d} blocks")
                    lines += ["    " + line for line in stat.traceback.format()[-8:]]
            previous[:] = [snap]
            with open(os.path.join(outdir, f"tracemalloc-{os.getpid()}.txt"), "a") as f:
                f.write("==== since the last dump\n" + "\n".join(lines) + "\n")

        signal.signal(signal.SIGUSR2, between_callbacks(dump_and_trace))
    else:
        signal.signal(signal.SIGUSR2, between_callbacks(dump))
    import importlib
    import asyncio  # noqa: F401  (imported before any privilege drop)
    cli = importlib.import_module(module)
    sys.argv = [module, *args]
    sys.exit(cli.main())


if __name__ == "__main__":
    main()
