"""A simulated phone for Mensajero: the device protocol over a real WebSocket.

Use it from the command line (`mensajero-agent --help`) or as a library:

    agent = Agent(AgentConfig(url=..., api_key=...), SimulatedBackend(), on_event=print)
    await agent.run()
"""

__version__ = "0.1.0"

from mensajero_agent.agent import (
    Agent,
    AgentConfig,
    AgentStoppedError,
    RegisterRejectedError,
)
from mensajero_agent.backend import (
    SendingBackend,
    SendOutcome,
    SimulatedBackend,
)
from mensajero_agent.events import EventRecorder
from mensajero_agent.ledger import MessageLedger

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentStoppedError",
    "EventRecorder",
    "MessageLedger",
    "RegisterRejectedError",
    "SendOutcome",
    "SendingBackend",
    "SimulatedBackend",
    "__version__",
]
