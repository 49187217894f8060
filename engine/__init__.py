"""Tributary: training-data attribution for large models (Source and FiMO on one spectral core)."""

import logging

__version__ = "0.1.0"


class _ExpectedCpuFallback(logging.Filter):
    """DeepSpeed, which accelerate imports whenever transformers loads a model, warns on every machine without a
    GPU that it fell back to the CPU: here that is the expected case, so the line is dropped (nothing else)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


logging.getLogger("DeepSpeed").addFilter(_ExpectedCpuFallback())
