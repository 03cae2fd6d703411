"""``Transport``: the kombu transport for ``amqps://`` brokers, whose TLS checks the name in the
broker's certificate.

kombu hands py-amqp the TLS options of an ``amqps://`` URL's query under the names redis-py
takes (``ssl_ca_certs``, ...), which py-amqp refuses; and py-amqp checks the certificate's name
only when told the server's, which kombu does not tell it: any certificate a trusted CA signed,
for whatever name, would do. This transport renames the options, verifies the certificate
unless the URL says ``ssl_cert_reqs=none``, and checks its name against the URL's host unless
it says ``ssl_check_hostname=false``.
"""

from __future__ import annotations

import ssl
from typing import Any

from kombu.transport import pyamqp

# The query's TLS parameters this transport takes, each named as py-amqp takes it.
AMQP_SSL_OPTIONS = {
    "ssl_ca_certs": "ca_certs",
    "ssl_certfile": "certfile",
    "ssl_keyfile": "keyfile",
    "ssl_cert_reqs": "cert_reqs",
    "ssl_ciphers": "ciphers",
    "ssl_check_hostname": "",  # not py-amqp's: whether server_hostname is given
}


def amqp_ssl_options(given: object) -> dict[str, Any]:
    """py-amqp's TLS options for what kombu parsed of an ``amqps://`` URL (a dict of the
    query's ``ssl_*`` parameters, or True for none). ``server_hostname`` None makes kombu fill
    in the URL's host. Options already in py-amqp's names are kept as they are."""
    options: dict[str, Any] = {}
    check_hostname = True
    for name, value in (given if isinstance(given, dict) else {}).items():
        if name == "ssl_check_hostname":
            check_hostname = bool(value)
        else:
            options[AMQP_SSL_OPTIONS.get(name) or name] = value
    options.setdefault("cert_reqs", ssl.CERT_REQUIRED)
    if check_hostname and options["cert_reqs"] != ssl.CERT_NONE:
        options.setdefault("server_hostname", None)
    return options


class Transport(pyamqp.SSLTransport):  # type: ignore[misc]
    """kombu's AMQP over TLS, with the options of ``amqp_ssl_options``."""

    def establish_connection(self) -> Any:
        self.client.ssl = amqp_ssl_options(self.client.ssl)
        return super().establish_connection()
