"""HTTP server: OpenAI-style video and image endpoints over a bounded job queue (`ditserve serve`)."""

from ditserve.server.app import create_app
from ditserve.server.runner import JobRunner, QueueFull, RunnerClosed, RunnerStats
from ditserve.server.settings import ServerSettings

__all__ = ["JobRunner", "QueueFull", "RunnerClosed", "RunnerStats", "ServerSettings", "create_app"]
