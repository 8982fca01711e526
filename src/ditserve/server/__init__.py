"""HTTP server (`ditserve serve`): OpenAI-style video and image endpoints; jobs run batched, from a bounded queue."""

from ditserve.server.app import create_app
from ditserve.server.runner import JobRunner, QueueFull, RunnerClosed, RunnerStats
from ditserve.server.settings import ServerSettings

__all__ = ["JobRunner", "QueueFull", "RunnerClosed", "RunnerStats", "ServerSettings", "create_app"]
