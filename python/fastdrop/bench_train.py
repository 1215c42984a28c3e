"""``python -m fastdrop bench --train`` and ``--layers``: where users feel the speed.

``--train`` times one training step (forward, backward, SGD) of real models with torch's and
timm's dropout modules against a deep copy of the same model (same weights) after
`fastdrop.nn.replace_dropout`, alternating the two in one process, medians of many rounds. It
reports the share of torch's dropout in torch's step (torch.profiler: the forward of the torch
and timm dropout modules, torch's aten dropout and bernoulli ops elsewhere, such as the attention
dropout inside torch's SDPA, and the backward nodes of all of these, over the step's CPU time)
and the share of torch's dropout left in the converted step, then the step times (medians) and
the speedup (the median of the per-round ratios, with a 95 % interval for it), for fastdrop at
its default thread count, at one thread, and at its default with another process keeping one
core busy (and, asked for, on fastdrop's own threads instead of torch's: ``own threads``; or
an unconverted copy of the model against the model itself, the run's noise floor:
``unconverted``).

``--layers`` times forward + backward (``torch.autograd.grad`` of the module's output) of every
dropout layer of those models at the shape it really sees (collected by hooking the modules
during one forward), fastdrop's module against the module it replaces, alternating, medians and
the speedup as ``--train`` gives it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import fastdrop

#: Models of the training-step table, in table order.
MODELS = ("encoder", "vit_tiny", "resnet50", "mixer", "mlp")
#: Default and ``--quick`` batch sizes.
BATCH = {"encoder": 32, "vit_tiny": 16, "resnet50": 8, "mixer": 8, "mlp": 32}
QUICK_BATCH = {"encoder": 4, "vit_tiny": 2, "resnet50": 2, "mixer": 2, "mlp": 32}
#: The MLP's step takes well under a millisecond: each timed sample runs this many steps
#: (2 with --quick).
STEPS_PER_SAMPLE = {"mlp": 20}
#: Settings of the training-step rows (``--settings`` picks among all of them).
SETTINGS = ("default", "1 thread", "busy core")
#: "own threads": fastdrop's default thread count on its own helpers instead of torch's threads
#: (`fastdrop.share_torch_threads(False)`), to compare the two.
#: "unconverted": a copy of the model that shares its weights and keeps torch's dropout, timed
#: against the model itself in the place of the converted copy: an A/A row, whose speedup and
#: interval show what the run cannot tell from 1.0x.
ALL_SETTINGS = SETTINGS + ("own threads", "unconverted")


def _import_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - the bench is only reachable with torch here
        raise SystemExit("--train and --layers need torch (pip install torch)") from e
    return torch


def _fnn():
    from . import nn

    return nn


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def build(name: str, batch: int, quick: bool = False):
    """(model, input, target, loss function) for one model of the table, seeded, in training
    mode. None when the model needs timm and timm is not installed."""
    torch = _import_torch()
    nn = torch.nn
    torch.manual_seed(0)
    if name == "encoder":
        # Post-norm (norm_first=False), the block of the reference material.
        layer = nn.TransformerEncoderLayer(
            256, 8, dim_feedforward=1024, dropout=0.1, batch_first=True
        )
        model: Any = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        x = torch.randn(batch, 32 if quick else 128, 256)
        y = torch.randn(x.shape)
        loss: Callable = nn.functional.mse_loss
    elif name == "mlp":
        # examples/train_d2l_mlp.py: d2l's MLP on 8x8 digits, minibatches of 32.
        model = nn.Sequential(
            nn.Linear(64, 256),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(256, 10),
        )
        x = torch.rand(batch, 64)
        y = torch.randint(0, 10, (batch,))
        loss = nn.functional.cross_entropy
    else:
        timm = _timm()
        if timm is None:
            return None
        if name == "vit_tiny":
            model = timm.create_model(
                "vit_tiny_patch16_224",
                pretrained=False,
                drop_rate=0.1,
                proj_drop_rate=0.1,
                attn_drop_rate=0.1,
                drop_path_rate=0.1,
            )
            px = 224
        elif name == "resnet50":
            model = timm.create_model(
                "resnet50", pretrained=False, drop_block_rate=0.1, drop_path_rate=0.1
            )
            px = 160
        elif name == "mixer":
            model = timm.create_model(
                "mixer_s16_224", pretrained=False, drop_rate=0.1, drop_path_rate=0.1
            )
            px = 224
        else:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        x = torch.randn(batch, 3, px, px)
        y = torch.randint(0, 1000, (batch,))
        loss = nn.functional.cross_entropy
    model.train()
    return model, x, y, loss


def _stepper(model, x, y, loss_fn, steps: int = 1) -> Callable[[], None]:
    torch = _import_torch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

    return step


def balanced_orders(n: int) -> List[List[int]]:
    """Orders of `n` callables in which, across the orders, every callable comes right after
    every other one equally often (a Williams design: n orders for even n, 2n for odd n).

    What a call costs depends on the call before it: code and data it left in the caches, and
    memory it freed (glibc hands torch's freed memory back to the OS at the next large `free`,
    which then pays milliseconds for it). Rotating three callables put fastdrop's row after
    torch's in two rounds of three and fastdrop's one-thread row after fastdrop's in two of
    three, which read Dropout (32, 128, 1024) at 7-9x against 15-16x in shuffled order, with
    the one-thread row faster than the two-thread one."""
    first = [0]
    low, high = 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(c + i) % n for c in first] for i in range(n)]
    if n % 2:
        orders += [order[::-1] for order in orders]
    return orders


def alternate_times(fns: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, List[float]]:
    """Seconds of each callable in each of `rounds` rounds, all of them once per round in turn
    (after one warm-up call each), in the `balanced_orders` by turns, so that a slow spell of a
    shared machine, or what one call leaves the next, hits all alike. Entry i of every list
    comes from round i: the lists pair up for `round_speedups`."""
    for f in fns.values():
        f()
    labels = list(fns)
    orders = balanced_orders(len(labels))
    times: Dict[str, List[float]] = {k: [] for k in labels}
    for r in range(rounds):
        for i in orders[r % len(orders)]:
            label = labels[i]
            t = time.perf_counter()
            fns[label]()
            times[label].append(time.perf_counter() - t)
    return times


def alternate(fns: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, float]:
    """Median seconds of each callable over `rounds` alternating rounds (`alternate_times`)."""
    return {k: statistics.median(v) for k, v in alternate_times(fns, rounds).items()}


#: The confidence of the speedup intervals of the --train and --layers tables.
CONFIDENCE = 0.95


def median_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> Optional[Tuple[float, float]]:
    """A distribution-free `confidence` interval for the median of the population `values`
    were drawn from (independently): the k-th smallest and k-th largest value, for the largest
    k whose coverage, 1 - 2 P(Binomial(n, 1/2) < k), is at least `confidence` (the sign-test
    interval: the median lies below the k-th smallest value only if fewer than k of the n draws
    fell below it). None when even the smallest and largest cover less: fewer than 6 values at
    0.95."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ordered = sorted(values)
    n = len(ordered)
    best = 0
    below = 0  # 2^n P(Binomial(n, 1/2) < k), exactly
    for k in range(1, n // 2 + 1):
        below += math.comb(n, k - 1)
        if 1.0 - 2.0 * below / 2**n < confidence:
            break
        best = k
    return (ordered[best - 1], ordered[n - best]) if best else None


def round_speedups(baseline: Sequence[float], candidate: Sequence[float]) -> List[float]:
    """The per-round speedups baseline[i] / candidate[i] of two callables timed in the same
    rounds (`alternate_times`). Their median is a row's speedup and `median_interval` its
    interval: one above 1 shows the candidate faster, one that contains 1 a difference the run
    cannot tell from noise."""
    if len(baseline) != len(candidate):
        raise ValueError("the two callables must be timed in the same rounds")
    return [b / c for b, c in zip(baseline, candidate)]


_INTERVAL_HEAD = f"{100 * CONFIDENCE:g}% interval"
_INTERVAL_NOTE = (
    f"{_INTERVAL_HEAD}: of the median per-round speedup (sign-test interval; '-' with fewer "
    "than 6 rounds); one that contains 1.00 is a difference the run cannot tell from noise"
)


def _speedup_fields(times: Dict[str, List[float]]) -> Dict[str, Any]:
    """A row's ``speedup`` (the median of torch's over fastdrop's per-round times) and its
    ``speedup_interval``, from `alternate_times`'s "torch" and "fastdrop" lists."""
    ratios = round_speedups(times["torch"], times["fastdrop"])
    return {"speedup": statistics.median(ratios), "speedup_interval": median_interval(ratios)}


def _interval_text(interval: Optional[Sequence[float]]) -> str:
    return "-" if interval is None else f"{interval[0]:.2f}-{interval[1]:.2f}"


#: The profiler label put around each torch/timm dropout module's forward.
_LABEL = "fastdrop.bench: dropout module"
_BACKWARD = "autograd::engine::evaluate_function:"


def _is_dropout_op(name: str) -> bool:
    """torch's own dropout ops (the attention dropout inside torch's SDPA math path too)."""
    low = name.lower()
    return name == _LABEL or (low.startswith("aten::") and ("dropout" in low or "bernoulli" in low))


#: The lines torch's profiler library (Kineto) writes to the process's stderr on every run on a
#: CPU-only machine: a marker at each start and stop, and the failed GPU count.
_KINETO_NOISE = re.compile(
    r"^(USDT:.*SyncActivityProfilerHandler\.cpp|ERROR:.*gpuGetDeviceCount failed)"
)


@contextlib.contextmanager
def quiet_profiler_log() -> Iterator[None]:
    """Holds back `_KINETO_NOISE` lines written to file descriptor 2 inside the block (Kineto
    writes them from C++, past `sys.stderr`, 21 lines in a `--train` run); anything else written
    there meanwhile is passed on to stderr when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not _KINETO_NOISE.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def dropout_share(step: Callable[[], None], model) -> float:
    """The share of one profiled `step` (torch.profiler, CPU time) spent in torch's dropout:
    the forward of every torch or timm dropout module of `model` (a profiler label is put around
    it, so timm's bernoulli_, mul and max_pool count as DropBlock's), torch's aten dropout and
    bernoulli ops anywhere else, and the backward nodes of every op inside these (linked by the
    autograd sequence number), over the CPU time of all top-level events."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    hooks = []
    for m in model.modules():
        if _layer_key(m) is None:
            continue

        def pre(mod, args):
            mod._fastdrop_bench_label = record_function(_LABEL)
            mod._fastdrop_bench_label.__enter__()

        def post(mod, args, out):
            mod._fastdrop_bench_label.__exit__(None, None, None)
            del mod._fastdrop_bench_label

        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        step()
        with quiet_profiler_log(), profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        for h in hooks:
            h.remove()
    events = list(prof.events())
    total = sum(e.cpu_time_total for e in events if e.cpu_parent is None)
    drop = 0.0
    sequence: set = set()
    for e in events:
        if not _is_dropout_op(e.name):
            continue
        parent = e.cpu_parent
        while parent is not None and not _is_dropout_op(parent.name):
            parent = parent.cpu_parent
        if parent is not None:
            continue
        drop += e.cpu_time_total
        todo = [e]
        while todo:
            ev = todo.pop()
            if ev.sequence_nr >= 0:
                sequence.add(ev.sequence_nr)
            todo.extend(ev.cpu_children)
    for e in events:
        if e.name.startswith(_BACKWARD) and e.sequence_nr in sequence:
            drop += e.cpu_time_total
    return drop / total if total > 0 else 0.0


#: The spinner stops by itself when its parent dies (it checks every few milliseconds), so a
#: benchmark killed inside a "busy core" row leaves no orphan burning a core.
_SPIN = (
    "import os\n"
    "parent = os.getppid()\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(100000):\n"
    "        pass\n"
)


class BusyCore:
    """A subprocess spinning on one core while the `with` block runs."""

    def __enter__(self) -> BusyCore:
        self.proc = subprocess.Popen([sys.executable, "-c", _SPIN])
        time.sleep(0.2)  # let it start spinning
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.kill()
        self.proc.wait()


def _sharing_weights(copied, original):
    """`copied` (a deep copy of `original`) with `original`'s own parameter and buffer tensors in
    place of its copies."""
    for kind in ("_parameters", "_buffers"):
        for name, mod in copied.named_modules():
            theirs = getattr(original.get_submodule(name), kind)
            mine = getattr(mod, kind)
            for key in mine:
                mine[key] = theirs[key]
    return copied


def train(
    models: Sequence[str],
    rounds: int,
    threads: int,
    batch: Optional[int] = None,
    quick: bool = False,
    settings: Sequence[str] = SETTINGS,
    log: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    """One record per (model, setting): step seconds with torch's modules and after
    `replace_dropout` (``fastdrop_seconds``; the unconverted copy's in the ``unconverted``
    setting), the speedup and the dropout-op shares."""
    torch = _import_torch()
    torch_threads = torch.get_num_threads()
    records: List[Dict[str, Any]] = []
    for name in models:
        b = batch or (QUICK_BATCH if quick else BATCH)[name]
        built = build(name, b, quick)
        if built is None:
            log(f"{name}: skipped, timm is not installed")
            continue
        built_model, x, y, loss = built
        # The converted model is a copy that shares the built model's parameters and buffers:
        # the two steps read and write the same weight memory, so only the dropout differs.
        # Two deep copies (the bench's first design) each had their own weights, and where
        # they sat in memory moved a step as much as the dropout does: measured on resnet50,
        # two unconverted copies alternating took 704 and 824 ms a step (537-554 ms in the next
        # run), and the converted copy 0.92-0.98x of one; sharing the weights, 40 rounds gave
        # 1.004x and 0.999x.
        model = built_model
        converted = _sharing_weights(copy.deepcopy(built_model), model)
        replaced = _fnn().replace_dropout(converted)
        steps = min(2, STEPS_PER_SAMPLE.get(name, 1)) if quick else STEPS_PER_SAMPLE.get(name, 1)
        torch_step = _stepper(model, x, y, loss, steps)
        fd_step = _stepper(converted, x, y, loss, steps)
        fastdrop.set_num_threads(threads)
        share = dropout_share(torch_step, model)
        left = dropout_share(fd_step, converted)
        for setting in settings:
            fd_threads = 1 if setting == "1 thread" else threads
            other, other_replaced, other_left = fd_step, len(replaced), left
            if setting == "unconverted":
                same = _sharing_weights(copy.deepcopy(built_model), model)
                other, other_replaced = _stepper(same, x, y, loss, steps), 0
                other_left = dropout_share(other, same)
            fastdrop.set_num_threads(fd_threads)
            fastdrop.share_torch_threads(setting != "own threads")
            try:
                if setting == "busy core":
                    with BusyCore():
                        times = alternate_times({"torch": torch_step, "fastdrop": other}, rounds)
                else:
                    times = alternate_times({"torch": torch_step, "fastdrop": other}, rounds)
            finally:
                fastdrop.set_num_threads(threads)
                fastdrop.share_torch_threads(True)
            med = {k: statistics.median(v) for k, v in times.items()}
            rec = {
                "model": name,
                "batch": b,
                "setting": setting,
                "fastdrop_threads": fd_threads,
                "torch_threads": torch_threads,
                "replaced": other_replaced,
                "dropout_share": share,
                "dropout_share_after": other_left,
                "torch_seconds": med["torch"] / steps,
                "fastdrop_seconds": med["fastdrop"] / steps,
                **_speedup_fields(times),
                "rounds": rounds,
            }
            records.append(rec)
            log(
                f"  {name} ({setting}): torch {1e3 * rec['torch_seconds']:.2f} ms, "
                f"fastdrop {1e3 * rec['fastdrop_seconds']:.2f} ms"
            )
    return records


def train_table(records: List[Dict[str, Any]]) -> str:
    lines = [
        "training step (forward, backward, SGD): torch's modules vs replace_dropout, "
        "alternating, medians; speedup = median of the per-round torch / fastdrop ratios",
        "share = torch's dropout in the torch step (torch.profiler CPU time: the torch/timm "
        "dropout modules' forward, aten dropout/bernoulli ops, and their backward nodes); "
        "left = torch's dropout still run by the converted step (by the copy, in an "
        "unconverted row)",
        f"{'model (batch)':<16} {'setting':<11} {'threads fd/torch':>16} {'share':>6} "
        f"{'left':>6} {'torch ms':>9} {'fastdrop ms':>11} {'speedup':>8} {_INTERVAL_HEAD:>12}",
    ]
    for r in records:
        lines.append(
            f"{r['model'] + ' (' + str(r['batch']) + ')':<16} {r['setting']:<11} "
            f"{str(r['fastdrop_threads']) + '/' + str(r['torch_threads']):>16} "
            f"{100 * r['dropout_share']:5.1f}% {100 * r['dropout_share_after']:5.1f}% "
            f"{1e3 * r['torch_seconds']:9.2f} {1e3 * r['fastdrop_seconds']:11.2f} "
            f"{r['speedup']:7.2f}x {_interval_text(r.get('speedup_interval')):>12}"
        )
    lines.append(_INTERVAL_NOTE)
    return "\n".join(lines)


# --- per-layer shapes -----------------------------------------------------------------------


def _rate(module) -> float:
    return float(getattr(module, "p", getattr(module, "drop_prob", 0.0)))


def _layer_key(module) -> Optional[str]:
    """A description of a dropout module fastdrop replaces (None for any other module), its
    drop_path rate left as ``*``: stochastic depth raises it block by block, and one row per
    shape at the highest rate says enough (a sample mask costs the same at any rate)."""
    if _fnn()._equivalent(module) is None:
        return None
    cls = type(module).__name__
    if cls == "DropPath":
        return "DropPath(*)"
    if cls == "DropBlock2d":
        return f"DropBlock2d({module.drop_prob:g}, {module.block_size})"
    return f"{cls}({module.p:g})"


def _describe(key: str, rate: float) -> str:
    return key.replace("*", f"{rate:g}")


def layer_shapes(
    models: Sequence[str], batch: Optional[int] = None, quick: bool = False
) -> List[Tuple[str, str, Tuple[int, ...], Any]]:
    """(model, layer description, input shape, module) for each distinct dropout layer and
    input shape the models run in one training forward (DropPath at its highest rate, see
    `_layer_key`); layers with a zero rate are left out."""
    torch = _import_torch()
    seen: Dict[Tuple[str, Tuple[int, ...]], Tuple[str, Tuple[int, ...], Any]] = {}
    for name in models:
        b = batch or (QUICK_BATCH if quick else BATCH)[name]
        built = build(name, b, quick)
        if built is None:
            continue
        model, x, _, _ = built
        hooks = []
        for m in model.modules():
            key = _layer_key(m)
            if key is None or not _rate(m):
                continue

            def hook(mod, args, _out, key=key, name=name):
                shape = tuple(args[0].shape)
                old = seen.get((key, shape))
                if old is None or _rate(old[2]) < _rate(mod):
                    seen[(key, shape)] = (name, shape, mod)

            hooks.append(m.register_forward_hook(hook))
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
    return [
        (name, _describe(key, _rate(mod)), shape, mod)
        for (key, _), (name, shape, mod) in seen.items()
    ]


def layers(
    models: Sequence[str],
    rounds: int,
    threads: int,
    batch: Optional[int] = None,
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    """Forward + backward of each layer shape: torch's or timm's module, fastdrop's at
    `threads` and at one thread, alternating."""
    torch = _import_torch()
    records = []
    for model, key, shape, mod in layer_shapes(models, batch, quick):
        theirs = copy.deepcopy(mod).train()
        ours = _fnn()._equivalent(mod).train()
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)

        def fwd_bwd(m, x=x, g=g):
            def f() -> None:
                torch.autograd.grad(m(x), x, g)

            return f

        def one_thread(f):
            def g1() -> None:
                fastdrop.set_num_threads(1)
                try:
                    f()
                finally:
                    fastdrop.set_num_threads(threads)

            return g1

        fastdrop.set_num_threads(threads)
        times = alternate_times(
            {
                "torch": fwd_bwd(theirs),
                "fastdrop": fwd_bwd(ours),
                "fastdrop_1": one_thread(fwd_bwd(ours)),
            },
            rounds,
        )
        med = {k: statistics.median(v) for k, v in times.items()}
        rec = {
            "model": model,
            "layer": key,
            "shape": list(shape),
            "replaces": f"{type(mod).__module__}.{type(mod).__qualname__}",
            "torch_seconds": med["torch"],
            "fastdrop_seconds": med["fastdrop"],
            "fastdrop_1thread_seconds": med["fastdrop_1"],
            **_speedup_fields(times),
            "fastdrop_threads": threads,
            "torch_threads": torch.get_num_threads(),
            "rounds": rounds,
        }
        records.append(rec)
        log(f"  {key} {shape}: {rec['speedup']:.2f}x")
    return records


def layers_table(records: List[Dict[str, Any]]) -> str:
    lines = [
        "dropout layers, forward + backward (torch.autograd.grad of the output): the torch/timm "
        "module vs fastdrop's, alternating, medians",
        f"{'model':<9} {'layer':<20} {'shape':<18} {'torch/timm ms':>13} {'fastdrop ms':>11} "
        f"{'speedup':>8} {_INTERVAL_HEAD:>12} {'fd 1 thread ms':>14}",
    ]
    for r in records:
        lines.append(
            f"{r['model']:<9} {r['layer']:<20} {str(tuple(r['shape'])):<18} "
            f"{1e3 * r['torch_seconds']:13.3f} {1e3 * r['fastdrop_seconds']:11.3f} "
            f"{r['speedup']:7.2f}x {_interval_text(r.get('speedup_interval')):>12} "
            f"{1e3 * r['fastdrop_1thread_seconds']:14.3f}"
        )
    if records:
        r = records[0]
        lines.append(
            f"fastdrop {r['fastdrop_threads']} threads, torch {r['torch_threads']} threads; "
            f"speedup = median of the per-round torch/timm time / fastdrop time ratios"
        )
        lines.append(_INTERVAL_NOTE)
    return "\n".join(lines)
