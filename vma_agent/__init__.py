"""VMA agent: the VMware-side gRPC agent (discovery, power, CBT, replication, progress)."""
