"""The ``twistd mailhub`` plugin: a ServiceMaker and nothing else."""

from twisted.application.service import ServiceMaker

mailhub = ServiceMaker(
    "mailhub",
    "mailhub.tap",
    "Mail and groupware integration hub: contacts, group hooks, pubsub, push, MailStore.",
    "mailhub",
)
