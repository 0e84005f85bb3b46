"""Read ground-truth pickles without letting them run code.

The Revisited Oxford / Paris ground truth ships as a pickle of dicts, lists, strings, ints and floats. A pickle
can name any importable callable and have it called while loading, so a tampered file could run code; this
loader resolves no global at all (the only way a pickle reaches code) and checks the result holds plain types.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from advbct.data.images import DataError

PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data types are accepted")


def _check_plain(value: object, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, where)
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, PLAIN_TYPES):
        raise DataError(f"{where} holds a {type(value).__name__}, not a plain data type")


def load_plain_pickle(path: str | Path) -> object:
    """The pickled value, refusing any file that would import a module or build a non-plain object."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    try:
        value = _PlainUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise DataError(f"{path} is not a readable plain-data pickle: {exc}") from exc
    _check_plain(value, path.name)
    return value
