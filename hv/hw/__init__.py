"""The modelled hardware: the CPU (Unicorn, behind hv.hw.engine) and its
MMU (walker, walk memo, TLB, page-walk caches). It decides that an access
faults or exits and raises the event; it never dispatches, and imports
nothing from hv.vmm."""
