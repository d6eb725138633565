"""mailhub: the integration hub of a self-hosted mail and groupware site.

One ``twistd mailhub`` process collects contacts into CardDAV, answers the
GroupServer web hooks, carries ESN-compatible pubsub over RabbitMQ, receives
Dovecot push notifications and answers MailStore's application integration.
"""

__version__ = "0.1.0"
