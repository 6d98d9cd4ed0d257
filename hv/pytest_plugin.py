"""hv's pytest plugin: the `hv` fixture, for tests of your own guests.

Installing hv registers this module with pytest (the `pytest11` entry point
in pyproject.toml), so any test can ask for the `hv` fixture:

    def test_hello(hv):
        r = hv.run("hello")                 # a path, a bundled guest, or source
        assert r.console.startswith("hello")

    @pytest.mark.hv_modes("shadow", "ept")  # or: pytest --hv-mmu=all
    def test_each_mode(hv):
        r = hv.run("pagetouch")             # runs in hv.mmu, the test's mode
        ...

`hv.run(guest)` takes a `Path`, or a `str` that is inline assembly source
if it contains a newline, else a path to a `.s`/`.bin` file or a bundled
guest's name, as for `hv.run` (so a mistyped name is an error that says so,
not a source of one unknown instruction).

Per-mode runs: a test that uses the fixture runs once per MMU mode of its
`hv_modes` marker, else of `--hv-mmu` (comma-separated modes, or `all`),
else once, in `native`, and unparametrized. The test's id names the mode:
`test_x[shadow]`.

`hv.assert_exits(actual, expected)` compares exit tables (a Result or a
window of one, `r.between(a, b)`, or their `exits`, against {reason: count})
and a failure shows each reason that differs.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from . import api
from .api import Figures, Result
from .arch.vmx import ExitReason
from .asm import assemble_source
from .errors import AsmError, HvError
from .vmm.modes import MODES

DEFAULT_MODE = "native"
MARKER = "hv_modes"
INLINE = "<inline>"         # the file name of inline sources in errors and Result.guest
_MODES_KEY = pytest.StashKey[tuple]()


# --- the fixture -------------------------------------------------------------

class RunResult(Result):
    """hv.Result with a one-line repr, so that pytest's explanation of a
    failed `assert r.exit_code == 0` does not print every counter."""

    def __repr__(self) -> str:
        return f"<hv.Result of {self.guest!r} in {self.mmu}: {self.detail}>"


class HvFixture:
    """What the `hv` fixture gives a test: `run`, `assert_exits`, `mmu`."""

    HvError = HvError           # so that a test can say pytest.raises(hv.AsmError)
    AsmError = AsmError

    def __init__(self, mmu: str = DEFAULT_MODE):
        self.mmu = mmu          # this test's MMU mode: what run() uses by default
        self.modes = tuple(MODES)   # every mode hv has

    def __repr__(self) -> str:
        return f"<hv fixture mmu={self.mmu!r}>"

    def run(self, guest: str | Path, mmu: str | None = None, **options) -> RunResult:
        """Run `guest` (a path, a bundled guest's name, or inline source: see
        the module's doc) in `mmu`, by default this test's mode. `options`
        are hv.run's (ram, vcpus, vms, max_insns, ...)."""
        __tracebackhide__ = True
        mmu = self.mmu if mmu is None else mmu
        try:
            if is_source(guest):
                image = assemble_source(guest, name=INLINE)
                result = api.run(INLINE, mmu=mmu, image=image.code, symbols=image.symbols,
                                 **options)
            else:
                result = api.run(guest, mmu=mmu, **options)
        except HvError as e:
            # hv's errors say what and where (file:line: statement); hv's
            # own frames below this point would only be noise.
            raise e.with_traceback(None) from None
        return RunResult(**{f.name: getattr(result, f.name) for f in fields(Result) if f.init})

    def assert_exits(self, actual, expected: dict[str, int]) -> None:
        """Assert an exit table is `expected` ({reason: count}; a reason left
        out must not occur). `actual` is a Result, a window of one
        (`Result.between()`), or their `exits`."""
        __tracebackhide__ = True
        assert ExitTable.of(actual) == ExitTable.of(expected)


def is_source(guest) -> bool:
    """Whether `hv.run(guest)` treats `guest` as inline assembly source."""
    return isinstance(guest, str) and "\n" in guest


@pytest.fixture
def hv(request) -> HvFixture:
    """Run guests under hv: `hv.run(guest, mmu=..., **options)` -> hv.Result,
    `hv.assert_exits(result, {...})`, `hv.mmu` (this test's mode)."""
    return HvFixture(getattr(request, "param", DEFAULT_MODE))


# --- exit tables and their diff ----------------------------------------------

class ExitTable(dict):
    """{exit reason: count} without zero counts."""

    @classmethod
    def of(cls, table) -> ExitTable:
        """From a Result or a window of one (between()), their `exits`, or
        a flat dict of counts (exit.<REASON>: the marks' form)."""
        __tracebackhide__ = True
        if isinstance(table, Figures):
            table = table.exits
        elif any(k.startswith("exit.") or k == "exits" for k in table):  # counters
            table = {k[5:]: v for k, v in table.items() if k.startswith("exit.")}
        unknown = sorted(set(table) - set(ExitReason.__members__))
        if unknown:
            raise ValueError(f"no exit reason {', '.join(unknown)} (reasons: "
                             f"{', '.join(ExitReason.__members__)})")
        return cls((k, v) for k, v in table.items() if v)

    def __repr__(self) -> str:
        return f"exits {dict(sorted(self.items()))}"


def is_exit_table(x) -> bool:
    """A dict of {VMX exit reason name: count}: Result.exits' form."""
    return isinstance(x, dict) and all(
        k in ExitReason.__members__ and isinstance(v, int) for k, v in x.items())


def exits_diff(actual: dict, expected: dict, verbose: bool = False) -> list[str]:
    """One line per reason that differs (every reason if `verbose`): the
    actual and expected count ("-" when a table has no entry), and by how
    much actual is off."""
    reasons = sorted(set(actual) | set(expected))
    width = max([len("reason")] + [len(r) for r in reasons])
    lines = [f"{'reason':<{width}}  {'actual':>8}  {'expected':>8}"]
    for r in reasons:
        a, e = actual.get(r), expected.get(r)
        row = f"{r:<{width}}  {'-' if a is None else a:>8}  {'-' if e is None else e:>8}"
        if a != e:
            lines.append(f"{row}  ({(a or 0) - (e or 0):+})")
        elif verbose:
            lines.append(row)
    return lines


def pytest_assertrepr_compare(config, op, left, right):
    """`assert exits == {...}` (or hv.assert_exits) failed: a table of the
    reasons that differ instead of pytest's generic dict diff."""
    if op == "==" and is_exit_table(left) and is_exit_table(right) and (left or right):
        return (["actual exits == expected exits"]
                + exits_diff(left, right, verbose=config.getoption("verbose", 0) > 0))
    return None


# --- options, marker, one run per mode ----------------------------------------

def pytest_addoption(parser):
    group = parser.getgroup("hv", "hv guests (the hv fixture)")
    group.addoption(
        "--hv-mmu", metavar="MODES", default=None,
        help="run each test that uses the hv fixture once per MMU mode: a "
             f"comma-separated list of {', '.join(MODES)}, or all (default: "
             f"{DEFAULT_MODE}, once). A test's {MARKER} marker takes precedence.")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"{MARKER}(*modes): run this test (it uses the hv fixture) once per "
                   f"MMU mode ({', '.join(MODES)}, or all); overrides --hv-mmu")
    option = config.getoption("hv_mmu")
    try:
        config.stash[_MODES_KEY] = parse_modes([option]) if option else ()
    except ValueError as e:
        raise pytest.UsageError(f"--hv-mmu: {e}") from None


def parse_modes(specs) -> tuple[str, ...]:
    """Mode names, each possibly a comma-separated list or `all` -> modes,
    in order, without repeats."""
    modes = []
    for spec in specs:
        for name in str(spec).split(","):
            name = name.strip()
            if name not in (*MODES, "all"):
                raise ValueError(f"no MMU mode {name!r} (modes: {', '.join(MODES)}, all)")
            modes += list(MODES) if name == "all" else [name]
    if not modes:
        raise ValueError("no MMU mode given")
    return tuple(dict.fromkeys(modes))


def pytest_generate_tests(metafunc):
    if "hv" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is not None:
        try:
            modes = parse_modes(marker.args)
        except ValueError as e:
            error = f"{metafunc.definition.nodeid}: @pytest.mark.{MARKER}: {e}"
        else:
            error = None
        if error:
            pytest.fail(error, pytrace=False)
    else:
        modes = metafunc.config.stash.get(_MODES_KEY, ())
    if modes:
        metafunc.parametrize("hv", modes, indirect=True, ids=list(modes))


# --- assertion rewriting -------------------------------------------------------
# assert_exits's diff needs pytest to rewrite this module's asserts. pytest
# does that for a plugin loaded through an entry point by marking the
# plugin's package before importing it. It finds the package in the
# distribution's list of files; an editable install (pip install -e) lists
# none, and pytest then looks for the package on sys.path, where it is only
# when the current directory is the checkout. Otherwise pytest imported this
# module unrewritten: import it again through pytest's import hook, which now
# rewrites it, and let that copy be the module (a module may replace itself in
# sys.modules while it is imported: the import returns the replacement).

def _import_rewritten() -> None:
    import importlib.util
    import sys

    this = sys.modules.get(__name__)
    if this is None or this.__loader__ in sys.meta_path:
        return          # loaded by pytest's import hook (a meta path finder): rewritten
    del sys.modules[__name__]           # (marking an imported module only warns)
    try:
        pytest.register_assert_rewrite(__name__)
        spec = importlib.util.find_spec(__name__)
        if spec is None or spec.loader not in sys.meta_path:
            sys.modules[__name__] = this    # not under pytest, or --assert=plain
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules[__name__] = this
        raise


_import_rewritten()
