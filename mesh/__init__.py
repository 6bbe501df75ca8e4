"""mesh: the data plane of the Docker routing mesh (listeners, proxy, balancing, health)."""

__version__ = "0.1.0"
