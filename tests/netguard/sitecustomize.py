"""Started by every Python process the tests start (this folder is on ``PYTHONPATH``)."""

import os

if os.environ.get("TESTS_NETWORK_LOG"):
    import netguard

    netguard.install()
