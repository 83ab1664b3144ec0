"""exfilwatch agent: the workstation service.

    watcher -> labels/index -> copy_detector -> attribution -> codec -> signer -> spool -> shipper

The watcher only enqueues filesystem observations; worker threads hash, label
and decide; decided events are sealed into signed batches in a durable spool
and shipped to the collector over mutual TLS.
"""

__version__ = "0.1.0"
