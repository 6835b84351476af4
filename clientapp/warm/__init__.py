"""The node-local warm trainer: the service (service.py), the ClientApp's client (client.py) and the wire
protocol both import (protocol.py). `fedtune-supernode --warm-trainer` starts it
(supernode/warm_trainer.py)."""
