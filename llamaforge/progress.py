"""Progress bars by bytes for work that can take a while: loading, converting, quantizing checkpoints.

Every such loop goes through `iterate_bytes`, which draws a tqdm bar on stderr counted in bytes, and only
once the work has lasted a second (tqdm's `delay`): quick loads stay silent, slow ones never are.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
DELAY_S = 1.0  # a bar appears only for work that lasts longer than this


def nbytes(value: Any) -> int:
    """Bytes a tensor (or a quantized tensor's raw blocks, or a numpy array) holds."""
    raw = getattr(value, "raw", value)
    if hasattr(raw, "numel") and hasattr(raw, "element_size"):
        return int(raw.numel() * raw.element_size())
    return int(getattr(raw, "nbytes", 0))


def iterate_bytes(items: Iterable[T], size_of: Callable[[T], int], desc: str, *, enabled: bool = True) -> Iterator[T]:
    """Yield `items`, advancing a bar by `size_of(item)` as each is done."""
    items = list(items)
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(total=sum(size_of(i) for i in items), desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              delay=DELAY_S, leave=False, dynamic_ncols=True) as bar:
        for item in items:
            yield item
            bar.update(size_of(item))
