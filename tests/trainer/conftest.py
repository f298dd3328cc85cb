from trainer_helpers import _hermetic_cache

__all__ = ["_hermetic_cache"]
