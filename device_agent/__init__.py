"""edgekit's device side: the shared formats (bundle, profile, schema) and the agent.

Importing this package does no work and pulls in nothing heavier than numpy; the runtimes
(onnxruntime, LiteRT) are imported only when a model is loaded.
"""

from .version import __version__

__all__ = ["Agent", "__version__"]


def __getattr__(name: str):
    # ``from device_agent import Agent`` without importing the agent (and its runtime) at package import.
    if name == "Agent":
        from .agent import Agent

        return Agent
    raise AttributeError(name)
