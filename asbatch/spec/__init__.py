"""Job specs: YAML files naming a sweep, a grid over RunConfig values and ordered stages, expanded into runs.

Nothing here knows Slurm or torch: the launcher turns a `Sweep` into job arrays (one per `SweepStage`, each
after the arrays of its `after` stages) and each stage's `Resources` into sbatch flags. Every mistake is a
`SpecError` with one message naming the file, the field as a dotted path and the offending value.

    sweep = load_sweep("jobs/fine_tune_c100.yaml")      # Sweep: stages in dependency order, runs with ids
    sweep = load_sweep(path, overrides={"defaults.optim.lr": parse_yaml("0.1")})  # same checks and messages
"""

from asbatch.spec.errors import SpecError, format_validation_error
from asbatch.spec.expand import Sweep, SweepRun, SweepStage, apply_overrides, expand, load_spec, load_sweep
from asbatch.spec.loading import parse_yaml
from asbatch.spec.resources import (
                                    ALLOWED_EXTRA_FLAGS,
                                    PROFILES_ENV,
                                    Profile,
                                    ProfileFile,
                                    Resources,
                                    available_profiles,
                                    find_profile,
                                    load_profile,
                                    parse_time,
                                    profile_dirs,
)
from asbatch.spec.schema import DEFAULT_STAGE, MAX_RUNS, Spec, SpecFile, StageSpec, parse_spec

__all__ = ["ALLOWED_EXTRA_FLAGS", "DEFAULT_STAGE", "MAX_RUNS", "PROFILES_ENV", "Profile", "ProfileFile", "Resources",
           "Spec", "SpecError", "SpecFile", "StageSpec", "Sweep", "SweepRun", "SweepStage", "apply_overrides",
           "available_profiles", "expand", "find_profile", "format_validation_error", "load_profile", "load_spec",
           "load_sweep", "parse_spec", "parse_time", "parse_yaml", "profile_dirs"]
