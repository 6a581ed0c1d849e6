"""wattsched node agent: applies NodePowerProfile power limits with NVML, exports DCGM metrics."""
