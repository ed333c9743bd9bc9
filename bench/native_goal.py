"""Issue 5's goal, side by side in one run: the native CPU kernel against eager and torch.compile of the
straightforward torch code, forward+backward at N = 256, V = 151,936, bfloat16 (docs/benchmarks.md).

The straightforward code is bench/providers.py's eager_loss. torch.compile is measured with default
(static) shapes, with N marked dynamic as bench/run.py's `compiled` provider does (where training
settles once N changes between batches), and compiling the same loss written as one sum over all
elements divided by N, which inductor turns into slower code. Speed-ups are given against the
fastest of the three. Native is measured as called by default (a fresh gradient buffer) and with
inplace_grad=True (the gradient written over the student's logits, which the caller hands over as a
model's forward makes them, before the timer). Providers run interleaved, round by round, so that
changes in the machine's load hit all of them alike.

Usage: python bench/native_goal.py   (ROUNDS=9 by default; about 2 minutes on 2 cores)
"""
import gc, os, resource, statistics, subprocess, sys, time
import torch
from aropd_kernels import anchored_residual_kl, native
from providers import LossSettings, eager_loss, model_output

N, V, DTYPE = 256, 151936, torch.bfloat16

def inputs():
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(N, V, generator=g) * 2).to(DTYPE).requires_grad_()
    a = (torch.randn(N, V, generator=g) * 2).to(DTYPE)
    f = (a.float() + torch.randn(N, V, generator=g)).to(DTYPE)
    return s, a, f

SETTINGS = LossSettings()  # reverse KL, lam = 1, clip = 5, T = 1: the public API's defaults


def straightforward(s, a, f):
    """bench/providers.py's eager_loss: float32 log-softmaxes, per-token divergence, mean."""
    return eager_loss(s, a, f, SETTINGS)


def plain_total(s, a, f):
    """The same loss written with one sum over all N x V elements divided by N (what this script
    measured before): inductor compiles it to slower code than the per-token sum."""
    ls = torch.log_softmax(s.float(), -1)
    la = torch.log_softmax(a.float(), -1)
    lf = torch.log_softmax(f.float(), -1)
    lq = torch.log_softmax(la + SETTINGS.lam * (lf - la).clamp(-SETTINGS.clip, SETTINGS.clip), -1)
    return (ls.exp() * (ls - lq)).sum() / s.shape[0]


def with_dynamic_rows(compiled):
    def call(s, a, f):
        for logits in (s, a, f):
            torch._dynamo.maybe_mark_dynamic(logits, 0)
        return compiled(s, a, f)

    return call


def native_inplace(s, a, f):
    """The same call with inplace_grad=True: the gradient overwrites the student's logits, as in a
    trainer where nothing reads them after the loss. Needs a non-leaf student (see student_input)."""
    return anchored_residual_kl(s, a, f, backend="native", inplace_grad=True)


PROVIDERS = {
    "native": lambda s, a, f: anchored_residual_kl(s, a, f, backend="native"),
    "native-inplace": native_inplace,
    "compile": torch.compile(straightforward),
    "compile N-dyn": with_dynamic_rows(torch.compile(straightforward)),
    "compile sum/N": torch.compile(plain_total),
    "eager": straightforward,
}

def student_input(name, s):
    """The student logits a provider is handed, made before its timer starts: inplace_grad overwrites
    them, so that provider gets a fresh non-leaf copy each call, as a model's forward produces them
    (bench/providers.py:model_output); the others differentiate with respect to `s` itself."""
    return model_output(s) if name == "native-inplace" else s


def step(fn, s, a, f):
    return torch.autograd.grad(fn(s, a, f), s)

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

def memory(name):  # run in a fresh process: peak RSS growth of fwd+bwd after warm-up
    s, a, f = inputs()
    step(PROVIDERS[name], student_input(name, s), a, f)
    students = [student_input(name, s) for _ in range(3)]  # made before the baseline: not growth
    gc.collect()
    base = rss_kb("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    for student in students:
        step(PROVIDERS[name], student, a, f)
    print((rss_kb("VmHWM:") - base) / 1024)

def bandwidth_gbs():
    x = torch.ones(128 * 2**20)  # 512 MiB float32
    times = []
    for _ in range(7):
        t0 = time.perf_counter(); x.sum(); times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9

def exp_rate_per_core():
    torch.set_num_threads(1)
    x = -torch.rand(1 << 14); y = torch.empty_like(x)
    t0 = time.perf_counter()
    for _ in range(2000): torch.exp(x, out=y)
    rate = 2000 * x.numel() / (time.perf_counter() - t0)
    torch.set_num_threads(2)
    return rate

if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory"]:
        memory(sys.argv[2]); sys.exit()
    print("load before:", os.getloadavg(), "threads:", torch.get_num_threads(), "isa:", native.instruction_set())
    s, a, f = inputs()
    for name, fn in PROVIDERS.items():  # warm-up (compiles)
        for _ in range(2): step(fn, student_input(name, s), a, f)
    times = {name: [] for name in PROVIDERS}
    cpu = {name: [] for name in PROVIDERS}  # process CPU time, less sensitive to other load than wall time
    for _ in range(int(os.environ.get("ROUNDS", 9))):  # interleaved rounds: load changes hit all alike
        for name, fn in PROVIDERS.items():
            student = student_input(name, s)
            c0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
            step(fn, student, a, f)
            times[name].append(time.perf_counter() - t0); c1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu[name].append(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    grad_mb = N * V * 2 / 2**20
    print(f"{'provider':14} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'CPU ms':>8} {'peak RSS growth MB':>19}")
    for name in PROVIDERS:
        growth = float(subprocess.run([sys.executable, __file__, "--memory", name], capture_output=True,
                                      text=True, check=True).stdout)
        t = times[name]
        print(f"{name:14} {medians[name]:10.1f} {min(t)*1e3:8.1f} {max(t)*1e3:8.1f} "
              f"{statistics.median(cpu[name])*1e3:8.1f} {growth:19.1f}")
    compiled = min((medians[name], name) for name in PROVIDERS if name.startswith("compile"))
    for name in ("native", "native-inplace"):
        print(f"speed-up of {name} (medians): {compiled[0] / medians[name]:.2f}x vs the fastest torch.compile "
              f"({compiled[1]}), {medians['eager'] / medians[name]:.2f}x vs eager")
    print(f"memory goal: <= 1.25 x {grad_mb:.1f} MB (bf16 gradient) + 64 MB = {1.25 * grad_mb + 64:.1f} MB")
    bw = bandwidth_gbs(); rate = exp_rate_per_core()
    elements = N * V
    print(f"read bandwidth (torch sum, 2 threads): {bw:.1f} GB/s; torch.exp: {rate / 1e9:.2f} G/s per core")
    print(f"bytes floor 8 B/elem = {elements * 8 / 1e6:.0f} MB -> {elements * 8 / bw / 1e6:.1f} ms; "
          f"the kernel's 14 B/elem from memory -> {elements * 14 / bw / 1e6:.1f} ms")
    print(f"exp floor 4/elem at torch.exp's rate -> {4 * elements / (2 * rate) * 1e3:.1f} ms on 2 cores "
          f"(the kernel computes 4/elem with its own exp)")
    print("load after:", os.getloadavg())
