"""elasticplan: exact elastic-pipelining plans for transformer inference on edge devices."""

__version__ = "0.1.0"
