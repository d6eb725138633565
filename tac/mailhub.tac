"""mailhub for ``twistd -ny tac/mailhub.tac``: the same makeService as the plugin.

The configuration file and the listen endpoint come from the environment:
``MAILHUB_CONFIG=/etc/mailhub/mailhub.ini MAILHUB_LISTEN=tcp:8080 twistd -ny tac/mailhub.tac``.
"""

import os

from twisted.application.service import Application

from mailhub.tap import Options, makeService

options = Options()
arguments = []
if os.environ.get("MAILHUB_CONFIG"):
    arguments += ["--config", os.environ["MAILHUB_CONFIG"]]
if os.environ.get("MAILHUB_LISTEN"):
    arguments += ["--listen", os.environ["MAILHUB_LISTEN"]]
options.parseOptions(arguments)

application = Application("mailhub")
makeService(options).setServiceParent(application)
