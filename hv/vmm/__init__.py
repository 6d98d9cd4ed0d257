"""The hypervisor: vCPUs catch what the hardware raises, the one dispatch
table handles exits, and the MMU modes (hv.vmm.modes) keep the VM's
memory virtualized."""
