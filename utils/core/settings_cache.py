"""The `Settings` of a model's configuration, validated once per configuration, not once per call.

The adapter reads its settings at every entry point (each predict batch among them), and a user may
edit `model.configuration` between calls. Validating the whole table each time is wasted work; a
snapshot of the configuration's option values tells whether anything changed, and only then is the
`Settings` rebuilt.
"""
import threading
from typing import Any, Mapping, Optional, Tuple

from utils.core import config as config_lib


def _snapshot(configuration: Optional[Mapping[str, Any]]) -> str:
    """The option values as text: an edit in place (a list appended to) or of type (True for 1) shows."""
    configuration = configuration or {}
    return repr([(key, configuration[key]) for key in config_lib.OPTIONS if key in configuration])


class SettingsCache:
    """`get(configuration)`: the same `Settings` object while the configuration's option values stay the same."""

    def __init__(self):
        self._last: Optional[Tuple[str, config_lib.Settings]] = None
        self._lock = threading.Lock()  # predict's pipeline reads from its own thread

    def get(self, configuration: Optional[Mapping[str, Any]]) -> config_lib.Settings:
        snapshot = _snapshot(configuration)
        with self._lock:
            if self._last is not None and self._last[0] == snapshot:
                return self._last[1]
            settings = config_lib.resolve(configuration)  # a ConfigError leaves the last good one cached
            self._last = (snapshot, settings)
            return settings
