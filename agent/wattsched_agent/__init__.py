"""wattsched node agent: applies NodePowerProfile power limits with NVML and exports DCGM-style metrics."""
