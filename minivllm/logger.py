"""The `minivllm` logger: INFO to stderr by default, like vLLM (MINIVLLM_LOG_LEVEL overrides)."""
import logging
import os


def configure() -> None:
    root = logging.getLogger("minivllm")
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(os.environ.get("MINIVLLM_LOG_LEVEL", "INFO").upper())
    root.propagate = False
