"""What the worker's main process does while it holds the leader lease: heartbeat, outbox relay,
reconcile, retention."""
