"""kombu transports: Redis (``redis``, the only module that touches kombu's private names, for
the broker and the reload exchange alike) and AMQP over TLS (``amqps``)."""
