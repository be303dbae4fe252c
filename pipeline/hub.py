"""Reaching the Hugging Face hub: one quick check per process instead of the hub client's retries on every file."""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)

HUB_HOST = ("huggingface.co", 443)
HUB_CHECK_TIMEOUT_S = 3.0
_hub_checked = False


def offline_unless_hub_reachable() -> None:
    """One quick check per process whether the Hugging Face hub answers; if not, the hub client goes offline.

    Offline, every hub request would otherwise wait for the client's retries (about 25 s per file, several files per
    model); in offline mode a cached file is still found at once and a missing one fails at once.
    """
    global _hub_checked
    from huggingface_hub import constants

    if _hub_checked or constants.HF_HUB_OFFLINE:
        return
    _hub_checked = True
    try:
        socket.create_connection(HUB_HOST, timeout=HUB_CHECK_TIMEOUT_S).close()
    except OSError as error:
        constants.HF_HUB_OFFLINE = True
        log.info("the Hugging Face hub is unreachable (%s): only weights already in its cache can be used", error)
