"""exfilwatch collector: the server.

    rpc -> verify (signature, sequence, chain, replay) -> store -> thresholds -> alerts

Agents enrol, then upload signed batches over mutual TLS; each batch is
verified over the received bytes before it is parsed, stored with its events
in one transaction, and acknowledged after commit.
"""

__version__ = "0.1.0"
