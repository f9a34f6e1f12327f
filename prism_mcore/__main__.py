"""`python -m prism_mcore ...`: see prism_mcore/cli.py."""

import sys
import warnings

# Megatron announces every optional accelerator it does not find (TE, Apex, absl) at import: noise on CPU runs.
warnings.filterwarnings(
    "ignore",
    message=".*(Transformer Engine|transformer-engine|Apex|absl|full scope is deprecated).*",
    category=UserWarning,
)

from prism_mcore.cli import main  # noqa: E402

sys.exit(main())
