"""hv kut: KVM's kvm-unit-tests on hv, each test in each MMU mode.

A test is what `x86/unittests.cfg` says of it, read as kvm-unit-tests'
scripts/common.bash reads it, its QEMU command line mapped onto hv.run's
options. What hv has no equivalent of (a CPU feature it lacks, a QEMU
device, a check of the KVM host's settings, a 32-bit build) makes the test
SKIP, saying why. A run is judged as scripts/runtime.bash judges one, from
the code the guest wrote to port 0xF4 as hv reports it: raw, not QEMU's
`(code << 1) | 1`.
"""
from __future__ import annotations

import ctypes
import os
import re
import shlex
import signal
import tarfile
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Sequence

from . import api
from .arch.cpuid import MAXPHYADDR, VENDOR
from .cost import DEFAULT_PROFILE
from .errors import HvError
from .hw.cpu import parse_cpu
from .memory import MiB, format_size, parse_size
from .vmm.modes import MODES
from .vmm.vm import MAX_KERNEL_RAM, Config

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_SOURCE = Path("../shared/kvm-unit-tests")   # beside the checkout
DEFAULT_MODES = ("native", "shadow", "ept")
CFG = "x86/unittests.cfg"
DEFAULT_RAM = 128 * MiB     # x86/run passes no -m: QEMU's default
DEFAULT_TIMEOUT = 90.0      # scripts/runtime.bash: ${timeout:-90s}
# Far more than a test's timeout lets hv run: the timeout bounds a test,
# as in kvm-unit-tests.
DEFAULT_MAX_INSNS = 10**11
NODEFAULT = "nodefault"     # the group kvm-unit-tests runs only when asked

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
# lib/report.c and lib/x86/io.c: exit(code) writes the code to port 0xF4.
EXIT_PASS, EXIT_FAIL, EXIT_SKIP, EXIT_ABORT = 0, 1, 77 >> 1, 127 >> 1

# -cpu items that are properties of QEMU's CPU, not features (parse_cpu's).
_HOST_PHYS_BITS = "host-phys-bits"      # MAXPHYADDR from the host: hv's is its own
# -machine properties hv can leave out: it has no PIT, and is its own accelerator.
_IGNORED_MACHINE = {"pit=off", "accel=tcg", "accel=kvm"}
_ACCELS = ("", "tcg", "kvm")


class _Skip(Exception):
    """A test option hv has no equivalent of: the test is skipped."""


@dataclass(frozen=True)
class Test:
    """One kvm-unit-tests test as hv runs it: hv.run's options, or why it
    cannot run on hv (`skip_reason`)."""
    name: str
    file: Path
    smp: int = 1
    append: str = ""            # the kernel's arguments (test_args, -append)
    cpu: str = ""               # hv's --cpu: QEMU's -cpu without its properties
    ram: int = DEFAULT_RAM
    groups: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    arch: str = ""
    skip_reason: str | None = None

    def to_json(self) -> dict:
        return dict(name=self.name, file=str(self.file), smp=self.smp, append=self.append,
                    cpu=self.cpu, ram=self.ram, groups=list(self.groups),
                    timeout=self.timeout, skip_reason=self.skip_reason)


@dataclass
class Outcome:
    """A test's run in one mode. `ended` is the Result's reason (None: not run)."""
    test: str
    mode: str
    status: str
    reason: str | None = None       # why it FAILed or SKIPped
    summary: str | None = None      # the console's last "SUMMARY: " line, after that
    seconds: float = 0.0
    exit_code: int | None = None
    ended: str | None = None
    insns: int = 0
    exits: int = 0
    mmio_exits: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        del d["test"], d["mode"]
        return d


# -- unittests.cfg ---------------------------------------------------------

_SECTION = re.compile(r"\[(.*)\]")
_KEY = re.compile(r"(\w+)\s*=\s*(.*)")
_LONG = '"""'


def parse_cfg(text: str) -> dict[str, dict[str, str]]:
    """unittests.cfg -> {test: {key: value}}, as scripts/common.bash reads
    it: `[name]` starts a test, `key = value` lines (values raw: test_args
    and qemu_params are shell words), `#` lines are comments, a value
    opened by \"\"\" runs to the line that ends with \"\"\" (backslash-newline
    joins lines). extra_params is the older name of qemu_params."""
    tests: dict[str, dict[str, str]] = {}
    entry: dict[str, str] | None = None
    lines = iter(text.splitlines())
    for line in lines:
        line = line.strip()
        if line.startswith("#"):
            continue
        if m := _SECTION.fullmatch(line):
            entry = tests[m[1]] = {}
        elif entry is not None and (m := _KEY.fullmatch(line)):
            value = _long_value(m[2][len(_LONG):], lines) if m[2].startswith(_LONG) else m[2]
            entry["qemu_params" if m[1] == "extra_params" else m[1]] = value
    return tests


def _long_value(first: str, lines) -> str:
    parts = [first]
    while not parts[-1].rstrip().endswith(_LONG):
        parts.append(next(lines, _LONG))        # the file's end closes it
    return "\n".join(parts).rstrip()[:-len(_LONG)].replace("\\\n", "").strip()


def make_test(name: str, entry: dict[str, str], images: Path) -> Test:
    """A cfg entry -> the Test; the first reason it cannot run on hv, in
    kvm-unit-tests' order (arch, accel, check, the image), then hv's."""
    reasons: list[str] = []

    def attempt(parse: Callable, default):
        try:
            return parse()
        except _Skip as e:
            reasons.append(str(e))
            return default

    file = images / entry.get("file", "")
    host = _host_reason(entry)
    if host:
        reasons.append(host)
    if not file.is_file():
        reasons.append("image not built")
    smp = attempt(lambda: _smp(entry.get("smp", "1")), 1)
    timeout = attempt(lambda: _duration(entry.get("timeout", "")), DEFAULT_TIMEOUT)
    append = attempt(lambda: " ".join(_words(entry.get("test_args", ""), "test_args")), "")
    params = attempt(lambda: _params(entry.get("qemu_params", "")), {})
    cpu = attempt(lambda: _cpu(params.get("cpu", "")), "")
    ram = params.get("ram", DEFAULT_RAM)
    attempt(lambda: _check_config(ram, smp, cpu), None)
    return Test(name=name, file=file, smp=smp, append=params.get("append", append), cpu=cpu,
                ram=ram, groups=tuple(entry.get("groups", "").split()), timeout=timeout,
                arch=entry.get("arch", ""), skip_reason=reasons[0] if reasons else None)


def _host_reason(entry: dict[str, str]) -> str | None:
    arch, accel, check = (entry.get(k, "") for k in ("arch", "accel", "check"))
    if arch and arch != "x86_64":
        return f"{arch} only"
    if accel not in _ACCELS:
        return f"{accel} only"
    if check:
        return f"check = {check}: a setting of KVM's host"
    return None


def _smp(text: str) -> int:
    if not text.isdigit():
        raise _Skip(f"smp = {text}: not a number of vCPUs")
    return int(text)


def _duration(text: str) -> float:
    """coreutils timeout's DURATION: a number, then s, m, h or d."""
    if not text:
        return DEFAULT_TIMEOUT
    m = re.fullmatch(r"(\d+(?:\.\d*)?)([smhd]?)", text)
    if m is None:
        raise _Skip(f"timeout = {text}: not a duration")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def _words(text: str, key: str) -> list[str]:
    """Shell words, as runtime.bash's eval splits them; a command to
    substitute is the shell's, not hv's."""
    if "`" in text or "$(" in text:
        raise _Skip(f"{key} = {text}: a shell command substitution")
    try:
        return shlex.split(text)
    except ValueError as e:
        raise _Skip(f"{key} = {text}: {e}") from None


def _params(text: str) -> dict:
    """QEMU's options -> {cpu, ram, append} for hv.run."""
    out: dict = {}
    words = iter(_words(text, "qemu_params"))
    for word in words:
        option = "-" + word.lstrip("-")         # QEMU takes -opt and --opt
        if option == "-enable-kvm":
            continue                            # hv is the accelerator
        value = next(words, None)
        if not word.startswith("-") or value is None:
            raise _Skip(f"qemu_params = {text}: cannot read {word!r}")
        if option == "-cpu":
            out["cpu"] = value
        elif option == "-m":
            out["ram"] = _ram(value)
        elif option == "-append":
            out["append"] = value
        elif option in ("-machine", "-M"):
            _machine(value)
        else:
            raise _Skip(f"{word} {value}: hv has no equivalent")
    return out


def _ram(value: str) -> int:
    """-m [size=]N[suffix][,slots=..,maxmem=..]: no suffix is MiB."""
    size = value.split(",")[0].removeprefix("size=")
    try:
        return int(size) * MiB if size.isdigit() else parse_size(size)
    except HvError:
        raise _Skip(f"-m {value}: not a size") from None


def _machine(value: str) -> None:
    for item in value.split(","):
        if item not in _IGNORED_MACHINE:
            raise _Skip(f"-machine {value}: hv has no equivalent of {item}")


def _cpu(spec: str) -> str:
    """QEMU's -cpu -> hv's --cpu: the properties of QEMU's CPU (phys-bits,
    vendor, host-phys-bits) checked against hv's CPU and taken out."""
    kept = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        if key == _HOST_PHYS_BITS:
            continue
        if key == "phys-bits":
            if value != str(MAXPHYADDR):
                raise _Skip(f"-cpu {spec}: phys-bits={value}: hv's CPU has {MAXPHYADDR}")
        elif key == "vendor":
            if value != VENDOR.decode():
                raise _Skip(f"-cpu {spec}: vendor={value}: hv's CPU is {VENDOR.decode()}")
        else:
            kept.append(item)
    features = ",".join(kept)
    try:
        parse_cpu(features)
    except HvError as e:
        raise _Skip(f"-cpu {spec}: {str(e).removeprefix('--cpu: ')}") from None
    return features


def _check_config(ram: int, smp: int, cpu: str) -> None:
    if ram > MAX_KERNEL_RAM:
        raise _Skip(f"{format_size(ram)} of RAM: hv gives a kernel at most "
                    f"{format_size(MAX_KERNEL_RAM)}")
    try:
        Config(ram=ram, vcpus=smp, cpu=cpu).check()
    except HvError as e:
        raise _Skip(str(e)) from None


# -- finding the tests -----------------------------------------------------

def load_tests(source: Path | Sequence[Path], names: Sequence[str] = (),
               groups: Sequence[str] = ()) -> list[Test]:
    """The tests in `source`: a kvm-unit-tests tree (x86/unittests.cfg, the
    images in x86/), a directory of .flat images (with the source tarball
    beside x86/, its cfg; without, each image a test with defaults), or
    image files. `names` (glob patterns) and `groups` choose; by default
    every test not in group nodefault. HvError for what is not there."""
    tests = _tests(source)
    for pattern in names:
        if not any(fnmatchcase(t.name, pattern) for t in tests):
            raise HvError(f"no test {pattern!r} in {_describe(source)} (hv kut --list "
                          "shows them)")
    for group in groups:
        if not any(group in t.groups for t in tests):
            raise HvError(f"no test in group {group!r} in {_describe(source)}")
    return [t for t in tests if _chosen(t, names, groups)]


def set_timeouts(tests: Sequence[Test], specs: Sequence[str]) -> list[Test]:
    """The tests with the timeouts of `specs` (hv kut --timeout), applied in
    order: SECONDS for every test, NAME=SECONDS for the tests NAME (a glob)
    matches; 0 is none. HvError for a bad one."""
    tests = list(tests)
    for spec in specs:
        pattern, _, text = spec.rpartition("=")
        try:
            seconds = float(text)
        except ValueError:
            raise HvError(f"--timeout {spec}: not [TEST=]SECONDS") from None
        if seconds < 0:
            raise HvError("--timeout must not be negative")
        if pattern and not any(fnmatchcase(t.name, pattern) for t in tests):
            raise HvError(f"--timeout {spec}: no test {pattern!r} is run")
        tests = [replace(t, timeout=seconds) if not pattern or fnmatchcase(t.name, pattern)
                 else t for t in tests]
    return tests


def _chosen(test: Test, names: Sequence[str], groups: Sequence[str]) -> bool:
    if names and not any(fnmatchcase(test.name, p) for p in names):
        return False
    if groups:
        return any(g in test.groups for g in groups)
    return bool(names) or NODEFAULT not in test.groups


def _describe(source: Path | Sequence[Path]) -> str:
    return str(source) if isinstance(source, (str, Path)) else ", ".join(map(str, source))


def _tests(source: Path | Sequence[Path]) -> list[Test]:
    paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    if not paths:
        raise HvError("no kvm-unit-tests: give a built tree or .flat images")
    for p in paths:
        if not p.exists():
            raise HvError(f"{p}: no such file or directory")
    if len(paths) == 1 and paths[0].is_dir():
        return _directory(paths[0])
    dirs = [p for p in paths if p.is_dir()]
    if dirs:
        raise HvError(f"{dirs[0]} is a directory: give one directory, or image files")
    return [Test(name=p.stem, file=p) for p in paths]


def _directory(directory: Path) -> list[Test]:
    images = directory / "x86" if (directory / "x86").is_dir() else directory
    text = _cfg_text(directory)
    if text is not None:
        return [make_test(name, entry, images) for name, entry in parse_cfg(text).items()]
    flats = sorted(images.glob("*.flat"))
    if not flats:
        raise HvError(f"{directory} has no {CFG} and no .flat images")
    return [Test(name=p.stem, file=p) for p in flats]


def _cfg_text(directory: Path) -> str | None:
    """The tree's x86/unittests.cfg, or the one in a source tarball beside
    prebuilt images (../shared/kvm-unit-tests is laid out so)."""
    try:
        if (directory / CFG).is_file():
            return (directory / CFG).read_text()
        for tarball in sorted(directory.glob("*.tar.gz")):
            with tarfile.open(tarball) as tar:
                for member in tar:
                    if member.name == CFG or member.name.endswith("/" + CFG):
                        return tar.extractfile(member).read().decode()
    except (OSError, tarfile.TarError, UnicodeDecodeError) as e:
        raise HvError(f"cannot read the tests of {directory}: {e}") from None
    return None


def split_args(items: Sequence[str]) -> tuple[list[Path], list[str]]:
    """`hv kut [SOURCE] [TEST ...]` -> (the source's paths, test names): the
    leading items that name paths (they exist, hold a / or end in .flat)
    are the source, the rest test names. No source: DEFAULT_SOURCE, from
    the current directory, if it is there."""
    n = 0
    while n < len(items) and _is_path(items[n]):
        n += 1
    sources = [Path(s) for s in items[:n]]
    if not sources:
        if not DEFAULT_SOURCE.is_dir():
            raise HvError("no kvm-unit-tests: give a built tree or .flat images")
        sources = [DEFAULT_SOURCE]
    return sources, list(items[n:])


def _is_path(item: str) -> bool:
    return "/" in item or item.endswith(".flat") or Path(item).exists()


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise HvError(f"unknown mode {unknown[0]!r}: choose from {', '.join(MODES)}")
    if not modes or len(set(modes)) != len(modes):
        raise HvError(f"--mmu needs distinct modes, e.g. native,shadow,ept (not {text!r})")
    return modes


# -- running ---------------------------------------------------------------

def judge(result: api.Result) -> tuple[str, str | None]:
    """PASS, FAIL or SKIP and why, as scripts/runtime.bash judges a run: a
    run that did not end by writing its code to port 0xF4 FAILs."""
    if result.reason != "exit":
        return FAIL, f"{result.reason}: {result.detail}"
    code = result.exit_code
    if code == EXIT_PASS:
        return PASS, None
    if code == EXIT_SKIP:
        return SKIP, f"exit code {code}: every test skipped"
    if code == EXIT_FAIL:
        return FAIL, f"exit code {code}: unexpected failures"
    if code == EXIT_ABORT:
        return FAIL, f"exit code {code}: aborted"
    return FAIL, f"exit code {code}"


def summary(console: str) -> str | None:
    """The last "SUMMARY: " line the guest printed, after that prefix."""
    lines = [line for line in console.splitlines() if line.startswith("SUMMARY: ")]
    return lines[-1].removeprefix("SUMMARY: ") if lines else None


def run_test(test: Test, mode: str, *, max_insns: int = DEFAULT_MAX_INSNS,
             profile: str = DEFAULT_PROFILE, logs: Path | None = None) -> Outcome:
    """Run `test` in MMU mode `mode` (not at all if it has a skip_reason),
    its clock on CPU profile `profile` (hv.cost); with `logs`, its console
    in logs/NAME.MODE.log as it is printed (`tail -f` follows a long
    run), after the `hv run` command that repeats it."""
    if test.skip_reason is not None:
        return Outcome(test.name, mode, SKIP, test.skip_reason)
    start = time.perf_counter()
    with _log(logs, test, mode, profile, max_insns) as log:
        try:
            r = api.run(test.file, mode, ram=test.ram, vcpus=test.smp, cpu=test.cpu,
                        append=test.append, max_insns=max_insns, timeout=test.timeout,
                        profile=profile, on_console=None if log is None else _echo(log))
        except HvError as e:
            if log is not None:
                log.write(f"\nhv: error: {e}\n".encode())
            return Outcome(test.name, mode, FAIL, str(e), seconds=time.perf_counter() - start,
                           ended="error")
        if log is not None:
            log.write(f"\nhv: ended: {r.reason}: {r.detail}; exit code {r.exit_code}\n".encode())
    status, reason = judge(r)
    return Outcome(test.name, mode, status, reason, summary(r.console),
                   time.perf_counter() - start, r.exit_code, r.reason, r.counters["insns"],
                   r.counters["exits"], r.counters["mmio_exits"])


def _log(logs: Path | None, test: Test, mode: str, profile: str,
         max_insns: int) -> AbstractContextManager[IO[bytes] | None]:
    """logs/NAME.MODE.log, opened with the command line that repeats the
    run (a null context without `logs`)."""
    if logs is None:
        return nullcontext()
    words = ["hv", "run", str(test.file), "--mmu", mode, "--ram",
             f"{test.ram // MiB}M" if test.ram % MiB == 0 else str(test.ram),
             "--vcpus", str(test.smp), "--profile", profile, "--max-insns", _count(max_insns)]
    for option, value in (("--cpu", test.cpu), ("--append", test.append),
                          ("--timeout", f"{test.timeout:g}" if test.timeout else "")):
        if value:
            words += [option, value]
    try:
        log = (logs / f"{test.name}.{mode}.log").open("wb", buffering=0)
    except OSError as e:
        raise HvError(f"--logs {logs}: {test.name}.{mode}.log: {e.strerror}") from None
    log.write((shlex.join(words) + "\n\n").encode())
    return log


def _count(n: int) -> str:
    """A count as --help spells it where it ends in zeros: 100000000000 -> 1e11."""
    digits = str(n).rstrip("0")
    zeros = len(str(n)) - len(digits)
    return f"{digits}e{zeros}" if zeros >= 3 else str(n)


def _echo(log: IO[bytes]) -> Callable[[int, int], None]:
    """on_console for api.run: each byte to `log` (unbuffered: a progress
    dot shows at once)."""
    return lambda _vm, byte: log.write(bytes((byte,)))


def run_all(tests: Sequence[Test], modes: Sequence[str], *,
            max_insns: int = DEFAULT_MAX_INSNS, profile: str = DEFAULT_PROFILE, jobs: int = 1,
            logs: Path | None = None,
            on_progress: Callable[[Test, str, int], None] | None = None) -> list[Outcome]:
    """Each test in each mode, the outcomes in that order; `on_progress(test,
    mode, done)` as each run starts. `jobs` > 1 runs that many at once, each
    in a process of its own. After Ctrl-C no run starts: those under way
    end interrupted, and the outcomes are the runs that ended. `logs`: a
    directory for each run's console (run_test)."""
    runs = [(test, mode) for test in tests for mode in modes]
    if logs is not None:
        try:
            logs.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HvError(f"--logs {logs}: {e.strerror}") from None
    if jobs > 1:
        return _run_parallel(runs, jobs, max_insns, profile, logs, on_progress)
    outcomes: list[Outcome] = []
    for test, mode in runs:
        if on_progress is not None:
            on_progress(test, mode, len(outcomes))
        outcomes.append(run_test(test, mode, max_insns=max_insns, profile=profile, logs=logs))
        if interrupted(outcomes[-1:]):
            break
    return outcomes


def _run_parallel(runs: list[tuple[Test, str]], jobs: int, max_insns: int, profile: str,
                  logs: Path | None,
                  on_progress: Callable[[Test, str, int], None] | None) -> list[Outcome]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ended: dict[int, Outcome] = {}
    queue = iter(enumerate(runs))
    pending = {}
    # spawn: a fork of a process with threads (rich's progress bar) is unsafe.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool, _forwarding_sigterm():
        def start() -> None:
            for i, (test, mode) in queue:
                if on_progress is not None:
                    on_progress(test, mode, len(ended))
                pending[pool.submit(_worker_run, test, mode, max_insns, profile, logs)] = i
                return
        try:
            for _ in range(jobs):
                start()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    ended[pending.pop(future)] = future.result()
                    if not interrupted(ended.values()):
                        start()
        except KeyboardInterrupt:
            # The workers had Ctrl-C (or SIGTERM) too: their runs end, interrupted.
            for future, i in pending.items():
                ended[i] = future.result()
    return [ended[i] for i in sorted(ended)]


@contextmanager
def _forwarding_sigterm():
    """SIGTERM, where the CLI makes it Ctrl-C, reaches this process only
    (Ctrl-C reaches the terminal's whole process group): pass it on to the
    workers, whose runs then end interrupted too."""
    if signal.getsignal(signal.SIGTERM) is not signal.default_int_handler:
        yield
        return

    def forward(signum, frame):
        import multiprocessing
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, signal.SIGTERM)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.default_int_handler)


_parent = 0         # a worker's parent: hv kut


def _worker_init() -> None:
    """A worker between runs ignores Ctrl-C and SIGTERM (the parent
    decides) while the parent lives. On Linux the worker has SIGTERM when
    the parent dies (kill -9 included): no run outlives `hv kut`."""
    global _parent
    _parent = os.getppid()
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)        # PR_SET_PDEATHSIG: prctl(2)
    except (OSError, AttributeError):
        pass
    _between_runs()


def _between_runs() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_if_orphaned)
    _exit_if_orphaned()


def _exit_if_orphaned(*_) -> None:
    if os.getppid() != _parent:
        os._exit(1)         # nobody waits for the outcome (its log is written)


def _worker_run(test: Test, mode: str, max_insns: int, profile: str,
                logs: Path | None) -> Outcome:
    """run_test in a worker, where Ctrl-C or SIGTERM ends the run, with its counts."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run_test(test, mode, max_insns=max_insns, profile=profile, logs=logs)
    finally:
        _between_runs()


def interrupted(outcomes: Sequence[Outcome]) -> bool:
    return any(o.ended == "interrupted" for o in outcomes)


def failed(outcomes: Sequence[Outcome]) -> bool:
    return any(o.status == FAIL for o in outcomes)


# -- reports (rich is imported by them only: hv starts without it) ---------------

def to_json(source: str, modes: Sequence[str], tests: Sequence[Test],
            outcomes: Sequence[Outcome]) -> dict:
    results: dict[str, dict] = {t.name: {} for t in tests}
    for o in outcomes:
        results[o.test][o.mode] = o.to_json()
    return dict(source=source, modes=list(modes),
                tests=[dict(t.to_json(), results=results[t.name]) for t in tests])


_STYLE = {PASS: "green", FAIL: "red", SKIP: "yellow"}


def _cell(o: Outcome | None) -> str:
    from rich.markup import escape
    if o is None:
        return "-"
    text = f"[{_STYLE[o.status]}]{o.status}[/]"
    if o.ended is not None:
        text += f" {o.seconds:.{1 if o.seconds >= 0.1 else 2}f} s"     # a fast run is no 0.0 s
    if o.status == FAIL:
        why = f"exit code {o.exit_code}" if o.ended == "exit" else o.ended
        text += f"\n[red]{escape(why)}[/]"
    return text


def _notes(tests: Sequence[Test], modes: Sequence[str],
           outcomes: Sequence[Outcome]) -> list[str]:
    """Why each test FAILed or SKIPped: a reason the test has in every mode
    once, and the tests skipped for the same reason on one line."""
    from rich.markup import escape
    by_test: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_test.setdefault(o.test, []).append(o)
    skipped: dict[str, list[str]] = {}
    notes = []
    for t in tests:
        if t.skip_reason is not None:
            skipped.setdefault(t.skip_reason, []).append(t.name)
            continue
        runs = [o for o in by_test.get(t.name, []) if o.status != PASS]
        same = len(runs) == len(modes) and len({(o.status, o.reason, o.summary)
                                                 for o in runs}) == 1
        for o in runs[:1] if same else runs:
            where = "" if same else f" [{o.mode}]"
            text = (f"{escape(t.name + where)}: [{_STYLE[o.status]}]{o.status}[/] "
                    f"{escape(o.reason or '')}")
            notes.append(text + (f" (SUMMARY: {escape(o.summary)})" if o.summary else ""))
    for reason, names in skipped.items():
        notes.append(f"[yellow]SKIP[/] ({escape(reason)}): {escape(', '.join(names))}")
    return notes


def print_results(tests: Sequence[Test], modes: Sequence[str], outcomes: Sequence[Outcome],
                  console: Console, wall: float | None = None) -> None:
    """The table (a row per test, a column per mode), then the reasons and
    the counts, in `wall` seconds (by default the runs' own, added up)."""
    from rich.markup import escape
    from rich.table import Table
    cells = {(o.test, o.mode): o for o in outcomes}
    t = Table(title="kvm-unit-tests", title_justify="left", title_style="bold", pad_edge=False)
    t.add_column("test")
    for m in modes:
        t.add_column(m)
    for test in tests:
        t.add_row(escape(test.name), *(_cell(cells.get((test.name, m))) for m in modes))
    console.print(t)
    notes = _notes(tests, modes, outcomes)
    if notes:
        console.print()
    for note in notes:
        console.print(note, highlight=False)
    counts = {s: sum(o.status == s for o in outcomes) for s in (PASS, FAIL, SKIP)}
    seconds = sum(o.seconds for o in outcomes) if wall is None else wall
    console.print(f"\n{len(outcomes)} runs: " + ", ".join(
        f"[{_STYLE[s]}]{n} {s}[/]" for s, n in counts.items()) + f" in {seconds:.1f} s",
        highlight=False)


def print_tests(tests: Sequence[Test], console: Console) -> None:
    """hv kut --list: each test, hv's options for it, or why it is skipped."""
    from rich.markup import escape
    from rich.table import Table
    t = Table(title="kvm-unit-tests", title_justify="left", title_style="bold", pad_edge=False)
    for col in ("test", "image", "vcpus", "RAM", "cpu", "append", "groups", "timeout",
                "skipped because"):
        t.add_column(col, justify="right" if col in ("vcpus", "RAM", "timeout") else "left")
    for test in tests:
        t.add_row(escape(test.name), escape(test.file.name), str(test.smp),
                  format_size(test.ram), escape(test.cpu), escape(test.append),
                  escape(" ".join(test.groups)), f"{test.timeout:g} s",
                  f"[yellow]{escape(test.skip_reason)}[/]" if test.skip_reason else "")
    console.print(t)
