"""Logging helper with upstream's name and call shape."""

import logging
import os

LOG_FORMAT = "%(asctime)s %(levelname)-8s %(process)d %(threadName)s %(message)s"


class _FileHandlerCreatingDir(logging.FileHandler):
    """Creates the log directory on the first record, so that merely importing a module leaves no trace."""

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


def get_logger(name, file_name):
    """The logger ``name`` writing to ``$FD_LOG_DIR/file_name`` (default directory ``log``).

    Calling it again with the same name re-targets the same ``logging.Logger``: the cache messager script first
    logs to ``cache_messager.log`` and, once it knows its rank, to ``cache_messager_rank{R}.log``.
    """
    log_dir = os.getenv("FD_LOG_DIR", "log")
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handler = _FileHandlerCreatingDir(os.path.join(log_dir, file_name), delay=True)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger
