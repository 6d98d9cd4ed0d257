"""The `hv` command line. Bad input: one clear line on stderr, exit status 2."""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from importlib import metadata
from pathlib import Path

from . import api, asm, compare, kut
from .cost import DEFAULT_PROFILE, bundled_profiles, check_modes, load_profile
from .errors import HvError
from .memory import parse_count, parse_size
from .vmm.exits import Trace, parse_reasons
from .vmm.agile import DEFAULT_KNOBS
from .vmm.modes import MODE_HELP, MODES
from .paths import bundled_guests



def _positive(text: str) -> int:
    """A whole number as --help prints them (5e8), or 1_000, 0x3e8."""
    try:
        value = parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _address(text: str) -> int:
    try:
        value = int(text.replace("_", ""), 0)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"not an address: {text!r} (e.g. 0x100000)")
    return value


def _positive_list(text: str) -> list[int]:
    return [_positive(t) for t in text.split(",")]


def _mark_pair(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"two mark ids, e.g. 1,2, not {text!r}")
    a, b = (_positive(t) if t.strip() != "0" else 0 for t in parts)
    if a == b:
        raise argparse.ArgumentTypeError(f"two different mark ids, e.g. 1,2, not {text!r}")
    return a, b


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except HvError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "--ram -64M": a value, as Python 3.13 reads it (before, only -64
        # and -6.4 were, and -64M an unknown option), so the type says
        # what is wrong with it.
        self._negative_number_matcher = re.compile(r"-\.?\d")

    def error(self, message: str):
        """Bad arguments: one line, status 2 (argparse would add the usage)."""
        raise HvError(f"{message} (see hv {'-h' if self.prog == 'hv' else self.prog[3:] + ' -h'})")


def _add_config_options(r: argparse.ArgumentParser) -> None:
    """The hv.vmm.vm.Config options `run` and `compare` share, each named as
    its field (--tlb-entries is tlb_entries; --no-memo is memo=False)."""
    r.add_argument("--ram", type=_size, default="64M", help="guest RAM, e.g. 64M, 1G (default 64M)")
    r.add_argument("--tlb-entries", type=_positive, default=1536,
                   help="TLB model capacity (default 1536)")
    r.add_argument("--tlb-ways", type=_positive, default=12,
                   help="TLB model associativity (default 12)")
    r.add_argument("--max-insns", type=_positive, default=500_000_000,
                   help="stop a runaway guest after this many instructions (default 5e8)")
    r.add_argument("--quantum", type=_positive, default=1_000_000,
                   help="instructions per vCPU time slice (default 1e6)")
    r.add_argument("--ept-large-pages", action="store_true",
                   help="the host backs guest memory with large pages: EPT maps 2 MiB (and "
                        "1 GiB) pages where it can, shadow tables 2 MiB pages where the guest "
                        "has them")
    r.add_argument("--ept-levels", type=int, choices=(4, 5), default=4,
                   help="EPT's levels (default 4; 5: 5-level EPT, up to 35-reference walks)")
    r.add_argument("--paging-levels", type=int, choices=(4, 5), default=4,
                   help="the paging a flat guest starts on (default 4; 5: CR4.LA57, "
                        "needs la57 in --cpu)")
    r.add_argument("--pwc", action="store_true",
                   help="page-walk caches and a nested TLB (fewer references per walk)")
    _add_profile_option(r)
    r.add_argument("--timeout", type=float, default=0,
                   help="stop after this many wall-clock seconds (default: no limit)")
    r.add_argument("--check-invariants", action="store_true",
                   help="check the VMM's isolation invariants after every exit (slow)")
    r.add_argument("--no-memo", dest="memo", action="store_false",
                   help="walk every TLB miss in full instead of replaying walks whose "
                        "tables did not change (slower; the counts are the same)")
    r.add_argument("--agile-policy", default="dynamic", metavar="POLICY",
                   help="agile: when subtrees go nested: dynamic (nested until the 2-D "
                        "walks cost `rent` references more than shadow walks, then shadowed "
                        "but where the guest writes its tables or loads CR3 often; knobs: "
                        f"dynamic:{DEFAULT_KNOBS}), whole (the whole VM "
                        "instead, as --mmu adaptive; the same knobs), shadow (never: shadow's "
                        "counts), nested (all: ept's counts)")
    r.add_argument("--cpu", default="", metavar="FEATURES",
                   help="the CPU's features, QEMU's -cpu spelling: max (all hv has, the "
                        "default), +feature, -feature, e.g. max,-pdpe1gb")


def _add_profile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"the CPU whose costs price the counts and run the guest's clock "
                        f"(RDTSC, the APIC timer): a bundled profile "
                        f"({', '.join(bundled_profiles())}) or a .toml file "
                        f"(default {DEFAULT_PROFILE})")


def _config(args) -> dict:
    return dict(ram=args.ram, tlb_entries=args.tlb_entries, tlb_ways=args.tlb_ways,
                max_insns=args.max_insns, quantum=args.quantum,
                ept_large_pages=args.ept_large_pages, ept_levels=args.ept_levels,
                paging_levels=args.paging_levels, pwc=args.pwc, timeout=args.timeout,
                check_invariants=args.check_invariants, memo=args.memo,
                agile_policy=args.agile_policy, cpu=args.cpu, profile=args.profile)


def _version() -> str:
    try:
        return metadata.version("hv")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hv", description="A toy x86-64 hypervisor that shows "
                                "what MMU virtualization costs.")
    p.add_argument("--version", action="version", version=f"hv {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)

    r = sub.add_parser("run", help="boot a guest and report what its memory management cost")
    r.add_argument("guest", nargs="+",
                   help="a .s or .bin file, a multiboot kernel (ELF, or a .s or .bin with a "
                        "multiboot header), or the name of a bundled guest (hv guests); "
                        "several: one VM each")
    r.add_argument("--append", default="", metavar="ARGS",
                   help="a multiboot kernel's command line after its name")
    r.add_argument("--module", dest="modules", action="append", default=[], metavar="FILE",
                   help="a file given to a multiboot kernel as a module (repeatable)")
    r.add_argument("--vms", type=_positive, default=1,
                   help="run this many VMs (the guests repeated) on one machine (default 1)")
    r.add_argument("--no-asid", dest="asid", action="store_false",
                   help="no VPID tags: every VM entry and exit flushes the TLB (first VT-x)")
    r.add_argument("--mmu", choices=MODES, default="native",
                   help="; ".join(f"{m}: {h}" for m, h in MODE_HELP.items()))
    r.add_argument("--vcpus", type=_positive, default=1, help="vCPUs sharing the VM (default 1)")
    _add_config_options(r)
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    r.add_argument("--between", type=_mark_pair, metavar="A,B",
                   help="also show what happened between vmcall marks A and B")
    r.add_argument("--trace", action="store_true",
                   help="trace every exit (vCPU, instructions, RIP, reason, qualification) "
                        "to stderr")
    r.add_argument("--trace-json", action="store_true", help="trace as JSON lines")
    r.add_argument("--trace-file", metavar="FILE", help="trace to FILE instead of stderr")
    r.add_argument("--trace-reason", metavar="REASON,...",
                   help="trace only these exit reasons, e.g. EPT_VIOLATION,CR_ACCESS")

    c = sub.add_parser("compare", help="run guests in several MMU modes and compare "
                                       "exits, walks and modelled cycles")
    c.add_argument("guest", nargs="*",
                   help=".s or .bin files or bundled guest names (default: the sample suite)")
    c.add_argument("--mmu", type=compare.parse_modes, default=compare.COUNTING_MODES,
                   help="modes to compare, comma-separated (default native,shadow,ept)")
    c.add_argument("--vcpus", type=_positive_list, default=[1],
                   help="vCPU counts, comma-separated: each guest runs at each (default 1)")
    c.add_argument("--between", type=_mark_pair, metavar="A,B",
                   help="price only what happened from vmcall mark A to mark B of the named "
                        "guests (default: a sample guest's own window, else the whole run)")
    c.add_argument("--plot", metavar="FILE", help="draw the modelled cycles to a .png or .svg")
    _add_config_options(c)
    c.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    k = sub.add_parser("kut", help="run KVM's kvm-unit-tests in MMU modes: PASS, FAIL or "
                                   "SKIP each")
    k.add_argument("source", nargs="?", metavar="SOURCE",
                   help="a kvm-unit-tests tree (x86/unittests.cfg), a directory of .flat "
                        "images, or images (default ../shared/kvm-unit-tests)")
    k.add_argument("tests", nargs="*", metavar="TEST",
                   help="the tests to run, by name or glob pattern (default: all but group "
                        "nodefault)")
    k.add_argument("--mmu", type=kut.parse_modes, default=kut.DEFAULT_MODES, metavar="MODES",
                   help=f"modes, comma-separated (default {','.join(kut.DEFAULT_MODES)})")
    k.add_argument("--group", action="append", default=[], metavar="G",
                   help="only the tests of group G (repeatable)")
    k.add_argument("--max-insns", type=_positive, default=kut.DEFAULT_MAX_INSNS,
                   help="stop a test after this many instructions (default 1e11: its "
                        "timeout stops it first)")
    k.add_argument("--timeout", action="append", default=[], metavar="[TEST=]SECONDS",
                   help="the wall-clock timeout of every test, or of TEST (a name or glob), "
                        "instead of unittests.cfg's (default 90 s); 0: none; repeatable, "
                        "applied in order (access needs 0: it runs for hours)")
    k.add_argument("-j", "--jobs", type=_positive, default=1, metavar="N",
                   help="run N tests at once, each in a process of its own (default 1)")
    k.add_argument("--logs", type=Path, metavar="DIR",
                   help="write each run's console to DIR/TEST.MODE.log as it is printed, "
                        "after the hv run command that repeats it")
    _add_profile_option(k)
    k.add_argument("--list", action="store_true",
                   help="print the tests and hv's options for each, without running them")
    k.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    sub.add_parser("guests", help="list the bundled sample guests")

    a = sub.add_parser("asm", help="assemble a .s file into a flat binary")
    a.add_argument("source")
    a.add_argument("-o", "--output", required=True, help="the .bin file to write")
    a.add_argument("--base", type=_address, default=0x100000,
                   help="load address (default 0x100000)")
    a.add_argument("--listing", action="store_true",
                   help="print each statement's address, bytes and file:line, and the labels")

    d = sub.add_parser("disasm", help="disassemble a flat binary (or a .s file's output)")
    d.add_argument("binary")
    d.add_argument("--base", type=_address, default=0x100000,
                   help="load address (default 0x100000)")
    return p


def _trace(args):
    """The run's Trace (None without a --trace option), and the file it
    writes, which the caller closes."""
    if not (args.trace or args.trace_json or args.trace_file or args.trace_reason):
        return None, None
    reasons = parse_reasons(args.trace_reason) if args.trace_reason else None
    out = sys.stderr
    if args.trace_file:
        try:
            out = open(args.trace_file, "w")
        except OSError as e:
            raise HvError(f"cannot write {args.trace_file}: {e.strerror}") from None
    return Trace(out, reasons, json_lines=args.trace_json), out


def _cmd_run(args) -> int:
    from .report import make_console, print_report
    streaming = not args.json
    out = sys.stdout

    several = len(args.guest) > 1 or args.vms > 1
    at_line_start: dict[int, bool] = {}

    def echo(vm: int, byte: int) -> None:
        if several and at_line_start.get(vm, True):
            out.write(f"[vm{vm}] ")
        at_line_start[vm] = byte == 0x0A
        out.write(chr(byte))
        out.flush()

    trace, trace_out = _trace(args)
    try:
        result = api.run(args.guest, mmu=args.mmu, vcpus=args.vcpus, asid=args.asid,
                         vms=args.vms, on_console=echo if streaming else None, trace=trace,
                         append=args.append, modules=args.modules, **_config(args))
    finally:
        if trace_out is not None and trace_out is not sys.stderr:
            trace_out.close()
    between = args.between
    missing = [m for m in between or () if m not in result.marks]
    if missing:
        between = None      # the report still shows, then the error
    if args.json:
        doc = result.to_json()
        if between:
            window = result.between(*between).flat()
            doc["between"] = {"marks": list(between),
                              "differences": {k: n for k, n in window.items() if n}}
        json.dump(doc, out, indent=2)
        out.write("\n")
    else:
        if not all(at_line_start.values()):
            out.write("\n")
        print_report(result, make_console(), between)
    if missing:
        raise HvError(f"--between: the guest recorded no mark {missing[0]} "
                      f"(its marks: {', '.join(map(str, sorted(result.marks))) or 'none'})")
    if result.reason == "interrupted":
        return 130
    return 0 if result.ok else 1


def _cmd_compare(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    profile = load_profile(args.profile)
    if args.plot and not args.plot.endswith((".png", ".svg")):
        raise HvError(f"--plot writes .png or .svg files, not {args.plot!r}")
    case_list = compare.cases(args.guest, args.vcpus, _config(args), args.between)
    for case in case_list:
        api.load_guest(case.guest)          # a bad name fails now, not after minutes
    modes = compare.runnable(args.mmu, profile)
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task("compare", total=len(case_list) * len(modes))

        def step(label: str, mode: str, done: int) -> None:
            bar.update(task, completed=done, description=f"{label} [{mode}]")

        doc = compare.compare(case_list, args.mmu, profile, progress=step)
    plotted = bool(args.plot and doc["cases"])
    if plotted:
        compare.plot(doc, args.plot)
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from .report import make_console, print_compare
        print_compare(doc, make_console())
        if plotted:
            print(f"plot: {args.plot}")
    if args.plot and not plotted:
        print(f"hv: no case finished: no plot written to {args.plot}", file=sys.stderr)
    if doc["interrupted"]:
        print("hv: interrupted: the cases finished before it are shown", file=sys.stderr)
        return 130
    return 0 if compare.all_ok(doc) else 1


def _cmd_kut(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from .report import make_console

    sources, names = kut.split_args([args.source, *args.tests] if args.source else [])
    tests = kut.load_tests(sources, names, args.group)
    tests = kut.set_timeouts(tests, args.timeout)
    source = " ".join(map(str, sources))
    check_modes(load_profile(args.profile), args.mmu)
    if args.list:
        if args.json:
            json.dump(kut.to_json(source, (), tests, ()), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            kut.print_tests(tests, make_console())
        return 0
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task("kut", total=len(tests) * len(args.mmu))

        def step(test: kut.Test, mode: str, done: int) -> None:
            bar.update(task, completed=done, description=f"{test.name} [{mode}]")

        start = time.perf_counter()
        outcomes = kut.run_all(tests, args.mmu, max_insns=args.max_insns, profile=args.profile,
                               jobs=args.jobs, logs=args.logs, on_progress=step)
        wall = time.perf_counter() - start
    if args.json:
        json.dump(kut.to_json(source, args.mmu, tests, outcomes), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        kut.print_results(tests, args.mmu, outcomes, make_console(), wall)
    if kut.interrupted(outcomes):
        print("hv: interrupted: the runs finished before it are shown", file=sys.stderr)
        return 130
    return 1 if kut.failed(outcomes) else 0


def _summary(path: Path) -> str:
    """The first sentence of a guest's header comment (after "name.s --")."""
    words = []
    try:
        for line in path.read_text().splitlines():
            if not line.lstrip().startswith((";", "#")):
                break
            text = line.strip().lstrip(";#").strip()
            if not text:
                break
            words.append(text)
    except (OSError, UnicodeDecodeError):
        return ""
    text = " ".join(words).split(" -- ", 1)[-1]
    return text.split(". ")[0].rstrip(".")


def _cmd_guests(args) -> int:
    for name, path in bundled_guests().items():
        print(f"{name:<12} {_summary(path) if path.suffix == '.s' else '(binary)'}")
    return 0


def _cmd_asm(args) -> int:
    image = asm.assemble_file(args.source, base=args.base)
    if args.listing:
        print("\n".join(asm.listing(image)))
    try:
        Path(args.output).write_bytes(image.code)
    except OSError as e:
        raise HvError(f"cannot write {args.output}: {e.strerror}") from None
    print(f"{args.output}: {len(image.code)} bytes at {args.base:#x}")
    return 0


def _cmd_disasm(args) -> int:
    path = Path(args.binary)
    symbols, code_bits = None, ()
    if path.suffix == ".s":
        image = asm.assemble_file(path, base=args.base)
        code, symbols, code_bits = image.code, image.symbols, image.code_bits
    else:
        try:
            code = path.read_bytes()
        except OSError as e:
            raise HvError(f"cannot read {path}: {e.strerror}") from None
    for line in asm.disassemble(code, args.base, symbols, code_bits):
        print(line)
    return 0


COMMANDS = {"run": _cmd_run, "compare": _cmd_compare, "guests": _cmd_guests, "asm": _cmd_asm, "disasm": _cmd_disasm,
            "kut": _cmd_kut}


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (kill, timeout(1), a CI job cancelled) is as Ctrl-C: the
    # counts so far are printed and `hv kut`'s workers end with it. Where
    # the parent ignores it, it stays ignored, as Ctrl-C does in Python.
    previous = None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        previous = _handle(signal.SIGTERM, signal.default_int_handler)
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except HvError as e:
        print(f"hv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0        # the reader went away (hv run | head): as other Unix tools
    finally:
        _handle(signal.SIGTERM, previous)


def _handle(signum: int, handler):
    """signal.signal where Python may set it (the main thread; None, a
    handler set outside Python, is left alone): the handler it replaced."""
    if handler is None:
        return None
    try:
        return signal.signal(signum, handler)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
