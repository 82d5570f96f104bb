"""gpufleet: rent GPUs only while there is work for them."""

__version__ = "0.1.0"
