"""Hypothesis profiles of the property tests, and the count of the cases each op ran.

Profiles, picked by DYNKERNELS_HYPOTHESIS_PROFILE (default "ci"):
  ci    derandomized: the same examples on every run and machine (no example database), few
        examples per test, so that the whole property suite stays near 90 s on two cores.
  deep  EXAMPLE_SCALE_DEEP times as many examples, random ones: the seed is
        DYNKERNELS_HYPOTHESIS_SEED if set (or pytest's --hypothesis-seed), else drawn once per
        run; it is printed in the test summary, so a failing run can be repeated exactly.
The property tests ask `examples(n)` for their budget: n under "ci", n * EXAMPLE_SCALE_DEEP
under "deep". Each test body calls `count(op)` once per case it runs; conftest.py prints the
counts at the end of the run ("property cases: compact 120, ...").
"""
import collections
import os
import random

from hypothesis import HealthCheck, core, settings

PROFILE_ENV = "DYNKERNELS_HYPOTHESIS_PROFILE"
SEED_ENV = "DYNKERNELS_HYPOTHESIS_SEED"
PROFILES = ("ci", "deep")
EXAMPLE_SCALE_DEEP = 20

_common = dict(
    deadline=None,  # the Triton interpreter and a shared machine make timings meaningless
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile("ci", derandomize=True, database=None, **_common)
settings.register_profile("deep", derandomize=False, **_common)

_chosen = os.environ.get(PROFILE_ENV, "ci")
if _chosen not in PROFILES:
    raise ValueError(f"{PROFILE_ENV} must be one of {PROFILES}, got {_chosen!r}")
settings.load_profile(_chosen)
if _chosen == "deep" and core.global_force_seed is None:
    # one seed for every test of the run; pytest's --hypothesis-seed, applied after this
    # module is imported, replaces it
    core.global_force_seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))


def profile() -> str:
    """The profile in force (pytest's --hypothesis-profile may have replaced the chosen one)."""
    return settings.get_current_profile_name()

CASES = collections.Counter()


def examples(n: int) -> int:
    """A test's example budget under the current profile (n in "ci")."""
    return n * EXAMPLE_SCALE_DEEP if profile() == "deep" else n


def count(op: str) -> None:
    """One property case of `op` ran (called in the test bodies)."""
    CASES[op] += 1


def describe() -> str:
    """The profile and how to repeat the run, for the test summary."""
    name, seed = profile(), core.global_force_seed
    if settings.default.derandomize:
        return f"hypothesis profile {name!r} (derandomized: the same examples every run)"
    if seed is None:
        return f"hypothesis profile {name!r}, random seed (printed by hypothesis on a failure)"
    return f"hypothesis profile {name!r}, seed {seed} (repeat: {SEED_ENV}={seed} {PROFILE_ENV}={name} python -m pytest ...)"
