"""Training loop, losses and metrics.

``rsseg.train`` is both this package and the API function ``rsseg.train(config, **overrides)``:
once any ``rsseg.train.*`` module is imported, Python binds the name ``rsseg.train`` to this
package, so the package itself is made callable and forwards to :func:`rsseg.api.train`.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from rsseg.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
