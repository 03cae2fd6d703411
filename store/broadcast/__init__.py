"""The reload exchange: the one codec of its messages, the publisher and the consumer."""
