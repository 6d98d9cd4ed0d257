"""The walk memo: the results of one VM's recent hardware walks, replayed
until a table they read is written (a speed-up only: a replayed walk counts
what it counted when it ran)."""
from __future__ import annotations


class WalkMemo:
    """The results of one VM's recent walks, each served again (counted as
    the same walk) until an entry it read may have changed.

    A walk costs microseconds of Python; a TLB-bound guest walks the same
    tables over and over. A replayed walk reads nothing, so it must be the
    walk the tables would give now: same references, same result, and no
    A/D bit left to set (an entry the walk would change is one it changed
    already, unless it was written since).

    Invariant: a result is kept only while no entry its walk read (guest
    tables, shadow tables, EPT) was written since. The VMM's writes reach
    `written` through PhysMem.on_write, entry by entry; the guest's are
    caught by frame: the fill path grants no write right to a frame in
    `frames` (the first write fills again and drops the whole frame), and a
    frame newly watched makes every engine of the VM drop its
    translations, so none keeps one with W. Walks with page-walk caches are
    never replayed: their references depend on the caches' state.
    """
    LIMIT = 1 << 16         # results kept; all are dropped beyond (speed only)

    def __init__(self, engines: list):
        self.engines = engines      # the VM's engines (Engine.flush_tlb)
        self.results: dict[int, tuple] = {}
        self.readers: dict[int, list[int]] = {}     # entry address -> keys of walks that read it
        # frame number -> entry addresses watched in it (a set: an entry
        # forgotten and watched again is one member, so it stays bounded)
        self.frames: dict[int, set[int]] = {}
        self.recording: list[int] | None = None     # entries read by the walk being recorded

    def put(self, key: int, result: tuple, entries: list[int]) -> None:
        if len(self.results) >= self.LIMIT or len(self.readers) >= 4 * self.LIMIT:
            self.clear()
        self.results[key] = result
        readers, frames = self.readers, self.frames
        new_frame = False
        for addr in entries:
            keys = readers.get(addr)
            if keys is not None:
                keys.append(key)
                continue
            readers[addr] = [key]
            watched = frames.get(addr >> 12)
            if watched is None:
                frames[addr >> 12] = {addr}
                new_frame = True
            else:
                watched.add(addr)
        if new_frame:
            for engine in self.engines:
                engine.flush_tlb()      # no alias may keep W on a watched frame

    def written(self, addr: int, length: int = 8) -> None:
        """The VMM wrote [addr, addr+length): forget the walks that read it."""
        if length == 8:
            self._forget(addr & ~7)
        else:
            for frame in range(addr >> 12, ((addr + length - 1) >> 12) + 1):
                for entry in self.frames.get(frame, ()):
                    if addr <= entry < addr + length:
                        self._forget(entry)

    def guest_writes(self, frame: int) -> None:
        """The guest may now write frame `frame`: forget every walk that read it."""
        for entry in self.frames.pop(frame, ()):
            self._forget(entry)

    def _forget(self, addr: int) -> None:
        keys = self.readers.pop(addr, None)
        if keys is not None:
            results = self.results
            for key in keys:
                results.pop(key, None)

    def clear(self) -> None:
        self.results.clear()
        self.readers.clear()
        self.frames.clear()
