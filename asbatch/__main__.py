"""`python -m asbatch ...` (what torchrun and srun launch) is the `asbatch` command."""

from asbatch.cli import main

main()
