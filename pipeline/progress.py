"""Progress reporting hooks: the command line passes a bar factory, libraries stay silent."""

from collections.abc import Callable
from typing import Protocol


class Bar(Protocol):
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


BarFactory = Callable[..., Bar]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def open_bar(factory: BarFactory | None, total: int, desc: str, unit: str) -> Bar:
    """A bar from ``factory(total=, desc=, unit=)``, or one that shows nothing."""
    if factory is None:
        return _NoBar()
    return factory(total=total, desc=desc, unit=unit)
