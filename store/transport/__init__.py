"""kombu transports: Redis (``redis``, the only module that touches kombu's private names) and
AMQP over TLS (``amqps``)."""
