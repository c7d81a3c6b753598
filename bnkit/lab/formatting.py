"""Numbers in words for claims and summaries: percentages, step counts, ratios."""

from __future__ import annotations

__all__ = ["number", "percent", "ratio_text", "steps_text"]


def percent(value: float | None, digits: int = 1) -> str:
    """An accuracy as a percentage; ``"n/a"`` when missing.

    Example:
        >>> percent(0.7234), percent(None)
        ('72.3%', 'n/a')
    """
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def steps_text(step: int | None) -> str:
    """A step count, or ``"never"`` when the target was not reached.

    Example:
        >>> steps_text(12000), steps_text(None)
        ('step 12,000', 'never')
    """
    return "never" if step is None else f"step {step:,}"


def ratio_text(value: float | None) -> str:
    """A speed-up ratio such as ``"3.2x"``; ``"n/a"`` when it cannot be computed.

    Example:
        >>> ratio_text(3.21), ratio_text(None)
        ('3.2x', 'n/a')
    """
    return "n/a" if value is None else f"{value:.1f}x"


def number(value: float | None, spec: str = ".3g") -> str:
    """A number in the format ``spec``; ``"n/a"`` when missing (a run that diverged).

    Example:
        >>> number(0.123456), number(None), number(2.5e-7, ".2g")
        ('0.123', 'n/a', '2.5e-07')
    """
    return "n/a" if value is None else format(value, spec)
