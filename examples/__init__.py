"""Runnable examples of trioserve (a package only so ``python -m examples.chat`` works)."""
