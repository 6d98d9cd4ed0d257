"""MMU modes. Each provides fill/translate/peek and the paging-control
events (write_cr, write_efer, invlpg); see native.py for the interface."""
from __future__ import annotations

MODES = ("native", "shadow", "ept", "qemu")
MODE_HELP = {
    "native": "the guest on bare metal: hv's walker and TLB model, no MMU exits",
    "shadow": "shadow paging: the VMM's shadow tables, exits on CR3 loads, INVLPG, "
              "page-table writes and hidden page faults",
    "ept": "EPT/nested paging: two-dimensional walks of the guest's tables and the VMM's EPT, "
           "exits on EPT violations",
    "qemu": "Unicorn's own MMU (QEMU's walker): the correctness oracle, nothing modelled",
}
